//! A process's memory map, as `/proc/<pid>/maps` reports it: parsed into
//! [`Mapping`]s, with the lookups the probe layers share (the mapping at an
//! address, the protections of a range, the gaps between mappings). The
//! live runtime reads its own (`runtime/maps.rs` adds the one-mapping
//! `PROCMAP_QUERY` ioctl); the remote tracer reads a traced process's.
//! Reading the file allocates: never from trap context.

use std::io;

use crate::probes::text::TextIdentity;

/// One line of a maps file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// First address.
    pub(crate) start: u64,
    /// One past the last address.
    pub(crate) end: u64,
    /// `PROT_READ | PROT_WRITE | PROT_EXEC` bits as the kernel reports them.
    pub(crate) prot: libc::c_int,
    /// A shared mapping (`s`): writes would reach the file or other
    /// processes.
    pub(crate) shared: bool,
    /// The file path, or a pseudo name like `[stack]`; empty for anonymous.
    pub(crate) path: String,
    /// File offset of `start` (for anonymous memory whatever the kernel
    /// prints, its page offset).
    pub(crate) offset: u64,
    /// The file's device (`makedev(major, minor)`; 0 for anonymous memory).
    pub(crate) device: u64,
    /// The file's inode (0 for anonymous memory).
    pub(crate) inode: u64,
}

impl Mapping {
    /// What is mapped (see [`TextIdentity`]).
    pub(crate) fn identity(&self) -> TextIdentity {
        TextIdentity {
            device: self.device,
            inode: self.inode,
            bias: self.start.wrapping_sub(self.offset),
        }
    }
}

/// A snapshot of the memory map, sorted by address (as the kernel prints it).
#[derive(Clone, Debug, Default)]
pub(crate) struct Maps {
    pub(crate) mappings: Vec<Mapping>,
}

impl Maps {
    /// Reads `/proc/self/maps`.
    pub(crate) fn read() -> io::Result<Maps> {
        let text = std::fs::read_to_string("/proc/self/maps")?;
        Ok(Maps::parse(&text))
    }

    /// Reads `/proc/<pid>/maps` (another process's: the caller may read it,
    /// as its tracer or as the same user). Used by the remote tracer, which
    /// is built for x86_64 only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn read_pid(pid: i32) -> io::Result<Maps> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        Ok(Maps::parse(&text))
    }

    /// Parses the text of a maps file; malformed lines are skipped.
    pub(crate) fn parse(text: &str) -> Maps {
        let mappings = text.lines().filter_map(parse_line).collect();
        Maps { mappings }
    }

    /// The mapping containing `addr`.
    pub(crate) fn find(&self, addr: u64) -> Option<&Mapping> {
        let at = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(at.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// The protection of every page of `[start, end)`, merged into runs of
    /// equal protection: `(run_start, run_end, prot)`. `None` if any byte is
    /// unmapped.
    pub(crate) fn protections(&self, start: u64, end: u64) -> Option<Vec<(u64, u64, i32)>> {
        let mut runs: Vec<(u64, u64, i32)> = Vec::new();
        let mut at = start;
        while at < end {
            let m = self.find(at)?;
            let run_end = m.end.min(end);
            match runs.last_mut() {
                Some(last) if last.2 == m.prot && last.1 == at => last.1 = run_end,
                _ => runs.push((at, run_end, m.prot)),
            }
            at = run_end;
        }
        Some(runs)
    }

    /// Where a `len`-byte block (a power of two, aligned to itself) fits
    /// in a free gap with every byte within `reach` of `near`, between
    /// `min_addr` and `max_addr`: in each gap the aligned start closest to
    /// `near`, all of them sorted closest first.
    pub(crate) fn places_near(
        &self,
        near: u64,
        len: u64,
        reach: u64,
        min_addr: u64,
        max_addr: u64,
    ) -> Vec<u64> {
        let lo = near.saturating_sub(reach).max(min_addr);
        let hi = near.saturating_add(reach).min(max_addr);
        let within = |c: u64| {
            let end = c.saturating_add(len);
            c.abs_diff(near) <= reach && end.abs_diff(near) <= reach
        };
        let mut places: Vec<u64> = self
            .gaps(lo, hi)
            .into_iter()
            .filter_map(|(s, e)| {
                let first = s.checked_add(len - 1)? & !(len - 1);
                let last = e.checked_sub(len)? & !(len - 1);
                if first > last {
                    return None;
                }
                Some(near.clamp(first, last) & !(len - 1)).filter(|&c| c >= first)
            })
            .filter(|&c| within(c))
            .collect();
        places.sort_by_key(|&c| c.abs_diff(near));
        places
    }

    /// Free gaps `[start, end)` between mappings (and below the first one,
    /// above `min_addr`), in address order.
    pub(crate) fn gaps(&self, min_addr: u64, max_addr: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut prev_end = min_addr;
        for m in &self.mappings {
            if m.start > prev_end {
                out.push((prev_end, m.start.min(max_addr)));
            }
            prev_end = prev_end.max(m.end);
            if prev_end >= max_addr {
                break;
            }
        }
        if prev_end < max_addr {
            out.push((prev_end, max_addr));
        }
        out.retain(|&(s, e)| s < e);
        out
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // "start-end perms offset dev inode   path"
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let device = libc::makedev(
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    let inode = fields.next()?.parse::<u64>().ok()?;
    let path = fields.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let start = u64::from_str_radix(s, 16).ok()?;
    let end = u64::from_str_radix(e, 16).ok()?;
    if perms.len() < 4 || start >= end {
        return None;
    }
    let mut prot = libc::PROT_NONE;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC;
    }
    Some(Mapping {
        start,
        end,
        prot,
        shared: perms[3] == b's',
        path,
        offset,
        device,
        inode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0a0000000-55d0a0001000 r--p 00000000 fe:01 123   /usr/bin/x
55d0a0001000-55d0a0003000 r-xp 00001000 fe:01 123   /usr/bin/x
55d0a0003000-55d0a0004000 rw-p 00003000 fe:01 123   /usr/bin/x
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
";

    #[test]
    fn lines_parse_into_ranges_protections_and_paths() {
        let maps = Maps::parse(SAMPLE);
        assert_eq!(maps.mappings.len(), 4);
        let text = maps.find(0x55d0a0002abc).unwrap();
        assert_eq!(text.prot, libc::PROT_READ | libc::PROT_EXEC);
        assert_eq!(text.path, "/usr/bin/x");
        assert_eq!(maps.find(0x7ffd00000000).unwrap().path, "[stack]");
        assert!(maps.find(0x55d0a0004000).is_none());
        // One file mapped contiguously: one identity for its three mappings.
        let id = text.identity();
        assert_eq!(id.inode, 123);
        assert_eq!(id.device, libc::makedev(0xfe, 1));
        assert_eq!(id.bias, 0x55d0a0000000);
        assert_eq!(maps.find(0x55d0a0000000).unwrap().identity(), id);
        assert_eq!(maps.find(0x55d0a0003000).unwrap().identity(), id);
        assert_ne!(maps.find(0x7ffd00000000).unwrap().identity(), id);
    }

    #[test]
    fn protections_split_at_mapping_boundaries_and_fail_on_holes() {
        let maps = Maps::parse(SAMPLE);
        let runs = maps.protections(0x55d0a0000ff0, 0x55d0a0001010).unwrap();
        assert_eq!(
            runs,
            vec![
                (0x55d0a0000ff0, 0x55d0a0001000, libc::PROT_READ),
                (
                    0x55d0a0001000,
                    0x55d0a0001010,
                    libc::PROT_READ | libc::PROT_EXEC
                ),
            ]
        );
        assert_eq!(maps.protections(0x55d0a0003ff0, 0x55d0a0004010), None);
    }

    #[test]
    fn places_near_are_aligned_free_within_reach_and_closest_first() {
        let maps = Maps::parse(SAMPLE);
        let near = 0x55d0a0001000;
        let places = maps.places_near(near, 0x10000, 1 << 31, 0x10000, 0x7fff00000000);
        assert_eq!(places.len(), 2, "{places:x?}");
        // Above the file (0xf000 away), then below it (0x11000 away).
        assert_eq!(places[0], 0x55d0a0010000);
        assert_eq!(places[1], 0x55d09fff0000);
        for &p in &places {
            assert_eq!(p % 0x10000, 0);
            assert!(maps.find(p).is_none() && maps.find(p + 0xffff).is_none());
        }
        assert!(maps
            .places_near(near, 0x10000, 0x1000, 0x10000, 0x7fff00000000)
            .is_empty());
    }

    #[test]
    fn gaps_are_the_holes_between_mappings_within_bounds() {
        let maps = Maps::parse(SAMPLE);
        let gaps = maps.gaps(0x10000, 0x7fff00000000);
        assert_eq!(gaps[0], (0x10000, 0x55d0a0000000));
        assert_eq!(gaps[1], (0x55d0a0004000, 0x7ffd00000000));
        assert_eq!(gaps[2], (0x7ffd00021000, 0x7fff00000000));
    }
}
