#!/usr/bin/env python3
"""Frida's cheapest listener on the runtime bench's function (issue 15).

Starts benches/frida/target (built by the caller), attaches Frida once the
target has timed its unprobed rounds, puts Interceptor.attach with a native
CModule onEnter (a counter increment: Frida's cheapest listener) on fr_work,
lets the target time its probed rounds, and prints one line:

  frida: plain P ns, probed Q ns, added A ns per call (CModule onEnter), hits H of C calls

Usage: driver.py TARGET N ROUNDS DIR
"""
import os
import subprocess
import sys

import frida

AGENT = r"""
const hits = Memory.alloc(8);
const cm = new CModule(`
#include <gum/guminterceptor.h>
extern volatile unsigned long hits;
void onEnter(GumInvocationContext *ic) { hits++; }
`, { hits });
Interceptor.attach(Process.mainModule.getExportByName('fr_work'), cm);
rpc.exports = { hits: () => hits.readU64().toString() };
"""


def main():
    exe, n, rounds, tmp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    go, end = os.path.join(tmp, "frida-go"), os.path.join(tmp, "frida-end")
    for f in (go, end):
        if os.path.exists(f):
            os.remove(f)
    p = subprocess.Popen([exe, n, rounds, go, end], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    session = frida.attach(p.pid)
    script = session.create_script(AGENT)
    script.load()
    open(go, "w").close()
    line = p.stdout.readline().split()
    hits = int(script.exports_sync.hits())
    session.detach()
    open(end, "w").close()
    p.wait()
    plain, probed, calls = float(line[1]), float(line[3]), int(line[5])
    print("frida: plain %.2f ns, probed %.2f ns, added %.2f ns per call (CModule onEnter), hits %d of %d calls"
          % (plain, probed, probed - plain, hits, calls))


if __name__ == "__main__":
    main()
