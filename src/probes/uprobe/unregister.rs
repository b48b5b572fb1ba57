//! Removing consumers: [`UprobeRegistry::unregister`] and
//! [`UprobeRegistry::reap_removed`].
//!
//! Invariant: a consumer leaves by a new consumer list published without it
//! (under the file's stripe), then a grace period of the domain, so when
//! `unregister` returns no hit and no return (`returns.rs`) can still be
//! running its handlers. More: [`crate::docs::algorithms::uprobes`].

use super::consumer::{Consumer, Member};
use super::registry::{site, slice, UprobeRegistry};
use super::space::{AddressSpace, UprobeKey};
use crate::probes::arch::Arch;
use crate::probes::ProbeError;
use crate::rcu::Flavor;

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// Removes `consumer` from the uprobe at `key`. When it was the last
    /// one, the breakpoints come out of every space and the uprobe goes.
    /// Waits for a grace period: when this returns, no handler and no
    /// return handler of `consumer` runs for `key` any more (calls in flight
    /// still return to their callers; see `returns.rs`).
    ///
    /// # Errors
    /// [`ProbeError::UnknownProbe`] if `consumer` is not registered on `key`
    /// (nothing changes).
    ///
    /// # Panics
    /// If called inside a read section of the domain (from a handler).
    pub fn unregister(&self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        self.unregister_locked(key, consumer)?;
        self.domain.synchronize();
        Ok(())
    }

    fn unregister_locked(&self, key: UprobeKey, consumer: &Consumer) -> Result<(), ProbeError> {
        let _file = self.files.lock(&key.file);
        let unknown = || ProbeError::UnknownProbe { site: site(key) };
        let up = self.uprobes.get_handle(&key).ok_or_else(unknown)?;
        let old: Vec<Member> = {
            let g = self.domain.read();
            up.consumers.load(&g).map_or_else(Vec::new, |l| l.to_vec())
        };
        let Some(pos) = old.iter().position(|c| c.same(consumer)) else {
            return Err(unknown());
        };
        let mut new = old.clone();
        new.remove(pos);
        // Spaces no remaining consumer wants lose the breakpoint.
        let g = self.domain.read();
        for (_, st) in self.spaces.iter(&g) {
            let id = st.space.id();
            if new.iter().any(|c| c.wants(id)) {
                continue;
            }
            let vaddrs: Vec<u64> = st
                .installs
                .iter(&g)
                .filter(|(_, i)| i.key == key)
                .map(|(v, _)| *v)
                .collect();
            for v in vaddrs {
                self.uninstall(up.value(), st, v, true);
            }
        }
        drop(g);
        if new.is_empty() {
            self.remove_uprobe(up.value());
        } else {
            up.consumers.replace(new.into());
        }
        Ok(())
    }

    /// Unregisters every consumer whose handler asked for removal
    /// ([`ConsumerAction::Remove`](super::ConsumerAction::Remove)); one
    /// grace period for all. Returns how many were removed.
    ///
    /// # Panics
    /// If called inside a read section of the domain.
    #[cold]
    pub fn reap_removed(&self) -> usize {
        let flagged: Vec<(UprobeKey, Consumer)> = {
            let g = self.domain.read();
            self.uprobes
                .iter(&g)
                .flat_map(|(k, u)| {
                    slice(u.consumers.load(&g))
                        .iter()
                        .filter(|c| c.is_removed())
                        .map(move |c| (*k, c.consumer.clone()))
                })
                .collect()
        };
        let n = flagged
            .iter()
            .filter(|(k, c)| self.unregister_locked(*k, c).is_ok())
            .count();
        if n > 0 {
            self.domain.synchronize();
        }
        n
    }
}
