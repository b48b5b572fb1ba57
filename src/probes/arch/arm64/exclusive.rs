//! Finding an open load-exclusive before a probe address.
//!
//! A trap between a load-exclusive and its store-exclusive clears the monitor,
//! so the retry loop would never end: a site inside a sequence is refused. The
//! scan walks backwards from the probe address (at most to the function's
//! start and [`EXCLUSIVE_SCAN_WINDOW`] instructions); the first
//! exclusive-related instruction decides. Linear, not a control-flow analysis.
//!
//! Why, and what the scan misses: [`crate::docs::algorithms::instructions`].

use super::decode::bits;

/// How many instructions before the probe address are scanned.
///
/// Compilers and hand-written atomics keep load-exclusive/store-exclusive
/// loops to a handful of instructions, because the architecture only
/// promises forward progress for short sequences without other memory
/// accesses or taken branches. 64 instructions (256 bytes) covers any real
/// sequence with a wide margin while refusing few unrelated sites after an
/// unpaired `ldaxr` used as a plain acquire load.
pub const EXCLUSIVE_SCAN_WINDOW: usize = 64;

/// What one instruction does to the exclusive monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MonitorEffect {
    /// Load-exclusive: arms the monitor.
    Arm,
    /// Store-exclusive or `clrex`: ends any sequence.
    Close,
    /// Neither.
    None,
}

fn monitor_effect(word: u32) -> MonitorEffect {
    // CLREX #imm: 0xd503305f with CRm in bits 11..8.
    if word & 0xffff_f0ff == 0xd503_305f {
        return MonitorEffect::Close;
    }
    // size 001000 o2 L o1: exclusives have o2 = 0 and are not CASP
    // (o1 = 1 with bit 31 = 0).
    let exclusive_group = bits(word, 29, 24) == 0b00_1000 && bits(word, 23, 23) == 0;
    let casp = bits(word, 21, 21) == 1 && word >> 31 == 0;
    if !exclusive_group || casp {
        MonitorEffect::None
    } else if bits(word, 22, 22) == 1 {
        MonitorEffect::Arm
    } else {
        MonitorEffect::Close
    }
}

/// The address of a load-exclusive that is still open at `addr`, scanning
/// back through `func_text` (which starts at `func_start`) at most
/// [`EXCLUSIVE_SCAN_WINDOW`] instructions. `addr` must be 4-byte aligned and
/// inside `func_text`'s range; instructions outside the given text are not
/// scanned.
pub(super) fn open_load_exclusive(func_start: u64, func_text: &[u8], addr: u64) -> Option<u64> {
    let index = usize::try_from((addr - func_start) / 4).ok()?;
    let words = func_text.chunks_exact(4).take(index);
    for (back, chunk) in words.rev().enumerate().take(EXCLUSIVE_SCAN_WINDOW) {
        let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        match monitor_effect(word) {
            MonitorEffect::Arm => return Some(addr - 4 * (back as u64 + 1)),
            MonitorEffect::Close => return None,
            MonitorEffect::None => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    const LDAXR_W0_X1: u32 = 0x885f_fc20;
    const STLXR_W3_W2_X1: u32 = 0x8803_fc22;
    const CMP_W0_W4: u32 = 0x6b04_001f;
    const NOP: u32 = 0xd503_201f;
    const CLREX: u32 = 0xd503_3f5f;
    const CASP: u32 = 0x4820_7c82; // casp x0, x1, x2, x3, [x4]
    const LDAR: u32 = 0xc8df_fc20; // ldar x0, [x1]

    #[test]
    fn monitor_effects_of_known_encodings() {
        assert_eq!(monitor_effect(LDAXR_W0_X1), MonitorEffect::Arm);
        assert_eq!(monitor_effect(0xc87f_0440), MonitorEffect::Arm); // ldxp x0, x1, [x2]
        assert_eq!(monitor_effect(STLXR_W3_W2_X1), MonitorEffect::Close);
        assert_eq!(monitor_effect(0xc823_0440), MonitorEffect::Close); // stxp w3, x0, x1, [x2]
        assert_eq!(monitor_effect(CLREX), MonitorEffect::Close);
        assert_eq!(monitor_effect(CASP), MonitorEffect::None);
        assert_eq!(monitor_effect(LDAR), MonitorEffect::None);
        assert_eq!(monitor_effect(NOP), MonitorEffect::None);
    }

    #[test]
    fn site_between_load_and_store_exclusive_is_inside() {
        let t = text(&[LDAXR_W0_X1, CMP_W0_W4, STLXR_W3_W2_X1, NOP]);
        assert_eq!(open_load_exclusive(0x1000, &t, 0x1004), Some(0x1000));
        assert_eq!(open_load_exclusive(0x1000, &t, 0x1008), Some(0x1000));
        assert_eq!(open_load_exclusive(0x1000, &t, 0x100c), None);
        assert_eq!(open_load_exclusive(0x1000, &t, 0x1000), None);
    }

    #[test]
    fn clrex_closes_the_sequence() {
        let t = text(&[LDAXR_W0_X1, CLREX, NOP]);
        assert_eq!(open_load_exclusive(0x1000, &t, 0x1008), None);
    }

    #[test]
    fn scan_stops_after_the_window() {
        let mut words = vec![LDAXR_W0_X1];
        words.extend(std::iter::repeat(NOP).take(EXCLUSIVE_SCAN_WINDOW));
        words.push(NOP);
        let t = text(&words);
        let last_in_window = 0x1000 + 4 * EXCLUSIVE_SCAN_WINDOW as u64;
        assert_eq!(
            open_load_exclusive(0x1000, &t, last_in_window),
            Some(0x1000)
        );
        assert_eq!(open_load_exclusive(0x1000, &t, last_in_window + 4), None);
    }
}
