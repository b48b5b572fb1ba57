//! Probe registries with kprobe and uprobe semantics, generic over the
//! architecture backend and the text memory they patch.
