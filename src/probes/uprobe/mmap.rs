//! Address-space events: [`UprobeRegistry::on_mmap`] and
//! [`UprobeRegistry::on_munmap`].
//!
//! The hit path's view of a space, a sorted array of its file mappings in an
//! [`RcuCell`], is replaced whole under the space's `maps_lock` (taken inside
//! the mapped file's stripe, see the lock order in `registry.rs`). More:
//! [`crate::docs::algorithms::uprobes`].

use core::ops::Range;

use super::install::{Prepared, Removals};
use super::registry::{slice, SpaceState, UprobeRegistry};
use super::space::{AddressSpace, FileId, FileMapping, SpaceId, UprobeKey};
use crate::probes::arch::{Arch, XolPlan, MAX_INSN_BYTES};
use crate::probes::text::TextMemory;
use crate::probes::ProbeError;
use crate::rcu::{Flavor, RcuCell};
use crate::seqtree::SeqTree;
use crate::sync::{Arc, Mutex};

impl<A: Arch, S: AddressSpace, F: Flavor> UprobeRegistry<A, S, F> {
    /// `space` mapped `mapping`: records it and installs every uprobe of the
    /// file in the mapped range (that some consumer's filter wants there).
    /// Returns the number of breakpoints written; one already present
    /// counts as installed (see `install`).
    ///
    /// # Errors
    /// The first install that fails (unsupported instruction, someone
    /// else's patch, ...). The mapping stays recorded and the installs
    /// before the failure stay, as they would in a kernel mmap that
    /// reports an error for one probe.
    pub fn on_mmap(
        &self,
        space: &std::sync::Arc<S>,
        mapping: FileMapping,
    ) -> Result<usize, ProbeError> {
        let _file = self.files.lock(&mapping.file);
        let id = space.id();
        let st = {
            let g = self.domain.read();
            let st = self.spaces.get_or_insert_with(&g, id, || {
                Arc::new(SpaceState {
                    space: std::sync::Arc::clone(space),
                    maps: RcuCell::new_in(Vec::new().into(), self.domain.clone()),
                    maps_lock: Mutex::new(()),
                    installs: SeqTree::with_domain(self.domain.clone()),
                    xol_shares: Default::default(),
                    returns: self.returns.new_pool(&**space),
                })
            });
            let _m = st.maps_lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut maps = st.maps.load(&g).map_or_else(Vec::new, |m| m.to_vec());
            maps.push(mapping.clone());
            maps.sort_by_key(|m| m.vaddr.start);
            st.maps.replace(maps.into());
            Arc::clone(st)
        };
        let range = mapping.file_range();
        let lo = UprobeKey {
            file: mapping.file,
            offset: range.start,
        };
        let hi = UprobeKey {
            file: mapping.file,
            offset: range.end,
        };
        let todo: Vec<UprobeKey> = {
            let g = self.domain.read();
            self.uprobes
                .range(&g, lo..hi)
                .filter(|(_, u)| slice(u.consumers.load(&g)).iter().any(|c| c.wants(id)))
                .map(|(k, _)| *k)
                .collect()
        };
        // The instructions read in one batch, prepared one by one
        // (stopping at the first failure), written in one text batch.
        let vaddrs: Vec<u64> = todo
            .iter()
            .map(|k| {
                mapping
                    .vaddr_of(k.offset)
                    .expect("the key was taken from the mapping's range")
            })
            .collect();
        let mut bytes = vec![0u8; vaddrs.len() * MAX_INSN_BYTES];
        let read = {
            let mut reads: Vec<(u64, &mut [u8])> = bytes
                .chunks_mut(MAX_INSN_BYTES)
                .zip(&vaddrs)
                .map(|(b, &v)| (v, &mut b[..self.insn_window(&mapping, v)]))
                .collect();
            space.text().read_many(&mut reads)
        };
        let mut prepared = Vec::with_capacity(todo.len());
        let mut first_err = None;
        for (i, key) in todo.into_iter().enumerate() {
            let Some(up) = self.uprobes.get_handle(&key) else {
                continue;
            };
            let vaddr = vaddrs[i];
            let pre = read[i]
                .is_ok()
                .then(|| &bytes[i * MAX_INSN_BYTES..][..self.insn_window(&mapping, vaddr)]);
            match self.prepare(up.value(), &st, key, vaddr, &mapping, pre) {
                Ok(Some(p)) => prepared.push((up, p)),
                Ok(None) => {}
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        let (ups, prepared): (Vec<_>, Vec<Prepared<S, F>>) = prepared.into_iter().unzip();
        let written = self.write_prepared(&prepared);
        let mut wrote = 0;
        for ((up, p), r) in ups.iter().zip(&prepared).zip(written) {
            match r {
                Ok(()) => wrote += usize::from(p.write),
                Err(e) => {
                    self.unprepare(up.value(), p, false);
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(wrote),
        }
    }

    /// `space` unmapped `range`: the mapped pieces inside it are forgotten
    /// (pieces outside it stay, split as needed) and the breakpoints
    /// installed there dropped without writing (the memory is gone).
    /// Returns the number of breakpoints dropped.
    pub fn on_munmap(&self, space: SpaceId, range: Range<u64>) -> usize {
        self.forget_range(space, range, false)
    }

    /// `space` is no longer probed (a tracer detaches from it): every
    /// breakpoint installed there is taken out, its original bytes written
    /// back (one text batch), and the space's mappings are forgotten; the
    /// uprobes stay for the other spaces. A later [`on_mmap`](Self::on_mmap)
    /// of the space starts afresh. Returns the number of breakpoints taken
    /// out.
    pub fn detach_space(&self, space: SpaceId) -> usize {
        self.forget_range(space, 0..u64::MAX, true)
    }

    /// [`on_munmap`](Self::on_munmap) and, with `restore`, the original
    /// bytes written back ([`detach_space`](Self::detach_space)).
    fn forget_range(&self, space: SpaceId, range: Range<u64>, restore: bool) -> usize {
        let Some(st) = ({
            let g = self.domain.read();
            self.spaces.get(&g, &space).cloned()
        }) else {
            return 0;
        };
        let files: Vec<FileId> = {
            let g = self.domain.read();
            let mut f: Vec<FileId> = st
                .maps
                .load(&g)
                .map_or(&[][..], |m| &m[..])
                .iter()
                .filter(|m| m.vaddr.start < range.end && range.start < m.vaddr.end)
                .map(|m| m.file)
                .collect();
            f.sort();
            f.dedup();
            f
        };
        let mut dropped = 0;
        for file in files {
            let _file = self.files.lock(&file);
            let g = self.domain.read();
            {
                let _m = st.maps_lock.lock().unwrap_or_else(|p| p.into_inner());
                let mut maps = Vec::new();
                for m in slice(st.maps.load(&g)).iter() {
                    if m.file != file || m.vaddr.end <= range.start || range.end <= m.vaddr.start {
                        maps.push(m.clone());
                        continue;
                    }
                    if m.vaddr.start < range.start {
                        maps.push(FileMapping {
                            vaddr: m.vaddr.start..range.start,
                            ..m.clone()
                        });
                    }
                    if range.end < m.vaddr.end {
                        maps.push(FileMapping {
                            vaddr: range.end..m.vaddr.end,
                            file: m.file,
                            file_offset: m.file_offset + (range.end - m.vaddr.start),
                        });
                    }
                }
                st.maps.replace(maps.into());
            }
            let gone: Vec<(u64, UprobeKey, Option<XolPlan>)> = st
                .installs
                .range(&g, range.clone())
                .filter(|(_, i)| i.key.file == file)
                .map(|(v, i)| (*v, i.key, i.plan))
                .collect();
            drop(g);
            // In one batch: the records in bulk, the install lists' old
            // versions in one callback, the slots in another.
            let mut removals = match restore {
                true => Removals::with_capacity(gone.len()),
                false => Removals::unmapped(gone.len()),
            };
            for (v, key, plan) in gone {
                // An install exists only while its uprobe does: both go
                // under this file's stripe, installs first.
                let up = self
                    .uprobes
                    .get_handle(&key)
                    .expect("an installed uprobe is in the tree");
                removals.push(&st, v, plan.as_ref(), up.value(), Some(&up));
                dropped += 1;
            }
            self.finish_removals(removals);
        }
        dropped
    }
}
