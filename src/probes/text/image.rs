//! [`Image`]: an in-memory text, a base address and a byte buffer.

use crate::probes::error::{CodeBytes, TextFailure};
use crate::probes::ProbeError;
use crate::sync::Mutex;

use super::TextMemory;

/// An in-memory code image at a fixed base address.
///
/// Reads and writes are bounds-checked against `[base, base + len)`; writes
/// compare the expected old bytes under the image's lock, so a check and its
/// write are one step for concurrent writers. For testing failure paths,
/// [`Image::fail_writes_after`] makes later writes fail without writing.
#[derive(Debug)]
pub struct Image {
    base: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    bytes: Vec<u8>,
    /// Writes that may still succeed before injected failures start
    /// (`None`: no injection).
    writes_left: Option<usize>,
    writes_done: usize,
}

impl Image {
    /// An image holding `bytes` at `base`.
    pub fn new(base: u64, bytes: impl Into<Vec<u8>>) -> Self {
        Image {
            base,
            inner: Mutex::new(Inner {
                bytes: bytes.into(),
                writes_left: None,
                writes_done: 0,
            }),
        }
    }

    /// The image's first address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.lock().bytes.len()
    }

    /// Whether the image holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the whole image, for byte-for-byte comparisons.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// Number of successful writes so far.
    pub fn writes_done(&self) -> usize {
        self.lock().writes_done
    }

    /// Failure injection: after `n` more successful writes, every write fails
    /// with [`TextFailure::Injected`] (nothing written). `None` stops it.
    pub fn fail_writes_after(&self, n: Option<usize>) {
        self.lock().writes_left = n;
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the bytes half-written
        // (copy_from_slice is the only mutation and runs after every check),
        // so a poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Index range of `[addr, addr + len)` in the buffer, if inside it.
    fn range(
        &self,
        total: usize,
        addr: u64,
        len: usize,
    ) -> Result<std::ops::Range<usize>, ProbeError> {
        let out = || ProbeError::TextAccess {
            addr,
            len,
            failure: TextFailure::OutOfRange,
        };
        let start = addr.checked_sub(self.base).ok_or_else(out)?;
        let start = usize::try_from(start).map_err(|_| out())?;
        let end = start.checked_add(len).ok_or_else(out)?;
        if end > total {
            return Err(out());
        }
        Ok(start..end)
    }
}

impl TextMemory for Image {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProbeError> {
        let inner = self.lock();
        let r = self.range(inner.bytes.len(), addr, buf.len())?;
        buf.copy_from_slice(&inner.bytes[r]);
        Ok(())
    }

    fn write(&self, addr: u64, expected_old: &[u8], new: &[u8]) -> Result<(), ProbeError> {
        if expected_old.len() != new.len() {
            return Err(ProbeError::PatchLengthMismatch {
                expected: expected_old.len(),
                new: new.len(),
            });
        }
        let mut inner = self.lock();
        let r = self.range(inner.bytes.len(), addr, new.len())?;
        let found = &inner.bytes[r.clone()];
        if found != expected_old {
            return Err(ProbeError::AlreadyPatched {
                addr,
                expected: CodeBytes::new(expected_old),
                found: CodeBytes::new(found),
            });
        }
        match inner.writes_left {
            Some(0) => {
                return Err(ProbeError::TextAccess {
                    addr,
                    len: new.len(),
                    failure: TextFailure::Injected,
                })
            }
            Some(ref mut n) => *n -= 1,
            None => {}
        }
        inner.bytes[r].copy_from_slice(new);
        inner.writes_done += 1;
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_checked_write_replaces_exactly_the_expected_bytes() {
        let image = Image::new(0x100, vec![1, 2, 3, 4]);
        image.write(0x101, &[2, 3], &[9, 9]).unwrap();
        assert_eq!(image.snapshot(), vec![1, 9, 9, 4]);
        let mut buf = [0u8; 2];
        image.read(0x102, &mut buf).unwrap();
        assert_eq!(buf, [9, 4]);
        assert_eq!(image.writes_done(), 1);
    }

    #[test]
    fn reads_outside_the_image_fail() {
        let image = Image::new(0x100, vec![1, 2, 3, 4]);
        let mut buf = [0u8; 2];
        for addr in [0xff, 0x103, 0x104, u64::MAX] {
            assert!(matches!(
                image.read(addr, &mut buf),
                Err(ProbeError::TextAccess {
                    failure: TextFailure::OutOfRange,
                    ..
                })
            ));
        }
    }

    #[test]
    fn an_injected_failure_writes_nothing() {
        let image = Image::new(0x100, vec![1, 2, 3, 4]);
        image.fail_writes_after(Some(1));
        image.write(0x100, &[1], &[7]).unwrap();
        let before = image.snapshot();
        assert!(matches!(
            image.write(0x101, &[2], &[8]),
            Err(ProbeError::TextAccess {
                failure: TextFailure::Injected,
                ..
            })
        ));
        assert_eq!(image.snapshot(), before);
        image.fail_writes_after(None);
        image.write(0x101, &[2], &[8]).unwrap();
        assert_eq!(image.snapshot(), vec![7, 8, 3, 4]);
    }

    #[test]
    fn of_two_racing_writers_expecting_the_same_bytes_exactly_one_wins() {
        let image = Image::new(0, vec![0x55; 64]);
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4u8)
                .map(|t| {
                    let image = &image;
                    s.spawn(move || {
                        (0..64u64)
                            .filter(|&a| image.write(a, &[0x55], &[t]).is_ok())
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 64);
        assert!(image.snapshot().iter().all(|&b| b < 4));
    }
}
