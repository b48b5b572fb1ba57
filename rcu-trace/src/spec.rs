//! Probe specs as written on the command line: `uprobe:PATH:SYMBOL[+OFFSET]`,
//! `uretprobe:PATH:SYMBOL`, `uprobe:PATH:0xOFFSET`, with `SYMBOL` a name or
//! a glob.
//!
//! The `PATH:PLACE` part is the crate's own text form
//! ([`UprobeTarget::parse`]: split at the last lone `:`, so a Rust path
//! `app:demo::work::parse` keeps its `::`), so a spec means here what a
//! target means to the library. The prefix says what is probed: the entry
//! (`uprobe`, bpftrace's `u`) or the entry and the return (`uretprobe`,
//! `ur`).

use std::fmt;

use rcu_registry::probes::uprobe::{TargetPlace, UprobeTarget};

/// What a spec probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Each call's entry (or the instruction at `+OFFSET`).
    Entry,
    /// Each call's entry and its return: return values and latencies.
    Return,
}

impl Kind {
    /// The spec prefix: `uprobe` or `uretprobe`.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Entry => "uprobe",
            Kind::Return => "uretprobe",
        }
    }
}

/// Where in the file a spec points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// One function by name (with an optional `@version`), `offset`
    /// bytes in.
    Symbol {
        /// The name.
        name: String,
        /// Bytes from the function's first instruction.
        offset: u64,
    },
    /// Every function whose name matches the glob ([`crate::glob`]).
    Glob(String),
    /// A file offset (`0x...`).
    FileOffset(u64),
}

/// A parsed probe spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The text as given.
    pub text: String,
    /// Entry or return.
    pub kind: Kind,
    /// The file: a path (with a `/`) or a bare library name.
    pub file: String,
    /// Where in it.
    pub place: Place,
}

/// Why a spec does not parse: the text and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// The spec as given.
    pub text: String,
    /// What is wrong, in a few words.
    pub why: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad probe spec `{}`: {}", self.text, self.why)
    }
}

impl std::error::Error for SpecError {}

/// Whether `name` holds a glob character (`*`, `?`, `[`).
pub fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

impl Spec {
    /// Reads one spec.
    ///
    /// # Errors
    /// An unknown prefix, a `PATH:PLACE` the library's parser refuses, an
    /// offset on a glob, or a uretprobe anywhere but at a function's entry
    /// (a `+OFFSET` or a file offset).
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let fail = |why: String| SpecError {
            text: text.to_string(),
            why,
        };
        let (prefix, rest) = text.split_once(':').ok_or_else(|| {
            fail(
                "expected uprobe:PATH:SYMBOL, uretprobe:PATH:SYMBOL or uprobe:PATH:0xOFFSET".into(),
            )
        })?;
        let kind = match prefix {
            "uprobe" | "u" => Kind::Entry,
            "uretprobe" | "ur" => Kind::Return,
            other => {
                return Err(fail(format!(
                    "unknown probe type `{other}` (uprobe or uretprobe)"
                )))
            }
        };
        let target = UprobeTarget::parse(rest).map_err(|e| {
            // The library's message names the inner text; ours the spec.
            let full = e.to_string();
            let why = full.rsplit_once("): ").map_or(full.as_str(), |(_, w)| w);
            fail(why.to_string())
        })?;
        let place = match target.place() {
            TargetPlace::FileOffset(o) => Place::FileOffset(*o),
            TargetPlace::Symbol { name, offset } if is_glob(name) => {
                if *offset != 0 {
                    return Err(fail("a glob takes no +OFFSET".into()));
                }
                crate::glob::check(name).map_err(fail)?;
                Place::Glob(name.clone())
            }
            TargetPlace::Symbol { name, offset } => Place::Symbol {
                name: name.clone(),
                offset: *offset,
            },
        };
        if kind == Kind::Return {
            match place {
                Place::Symbol { offset: 0, .. } | Place::Glob(_) => {}
                _ => {
                    return Err(fail(
                        "a uretprobe goes on a function's entry: give a SYMBOL, without +OFFSET"
                            .into(),
                    ))
                }
            }
        }
        Ok(Spec {
            text: text.to_string(),
            kind,
            file: target.file().to_string(),
            place,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_parse() {
        let s = Spec::parse("uprobe:libc:getpid").unwrap();
        assert_eq!((s.kind, s.file.as_str()), (Kind::Entry, "libc"));
        assert_eq!(
            s.place,
            Place::Symbol {
                name: "getpid".into(),
                offset: 0
            }
        );
        let s = Spec::parse("uprobe:/bin/ls:main+0x4").unwrap();
        assert_eq!(
            s.place,
            Place::Symbol {
                name: "main".into(),
                offset: 4
            }
        );
        let s = Spec::parse("ur:libc.so.6:str*").unwrap();
        assert_eq!(
            (s.kind, s.place),
            (Kind::Return, Place::Glob("str*".into()))
        );
        let s = Spec::parse("uprobe:./app:0x1a2b").unwrap();
        assert_eq!(s.place, Place::FileOffset(0x1a2b));
        let s = Spec::parse("uprobe:app:demo::work::parse").unwrap();
        assert_eq!(s.file, "app");
    }

    #[test]
    fn bad_specs_say_why_in_one_line() {
        for bad in [
            "getpid",
            "kprobe:libc:getpid",
            "uprobe:libc",
            "uprobe:libc:",
            "uprobe:libc:12",
            "uprobe:libc:f+zz",
            "uprobe:libc:str*+4",
            "uretprobe:libc:f+4",
            "uretprobe:libc:0x10",
            "uprobe:libc:[abc",
        ] {
            let e = Spec::parse(bad).unwrap_err();
            let line = e.to_string();
            assert!(!line.contains('\n') && line.contains(bad), "{line}");
        }
    }
}
