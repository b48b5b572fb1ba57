//! [`Short`]: the read-mostly lists the hit path reads (a uprobe's
//! consumers and installs, a space's mappings), stored so that the usual
//! one-element list costs the hit path one pointer chase, not two: a single
//! element is kept inline in the [`RcuCell`](crate::rcu::RcuCell)'s
//! allocation, longer lists spill to a slice; readers see a `&[T]` either way.
//!
//! Why: [`crate::docs::algorithms::uprobes`].

use core::ops::Deref;

/// A list of `T` that keeps a single element inline. See the module docs.
#[derive(Clone, Debug)]
pub(crate) enum Short<T> {
    /// Exactly one element, inline.
    One([T; 1]),
    /// Any other length.
    Many(Box<[T]>),
}

impl<T> Deref for Short<T> {
    type Target = [T];

    #[inline(always)]
    fn deref(&self) -> &[T] {
        match self {
            Short::One(a) => a,
            Short::Many(b) => b,
        }
    }
}

impl<T> From<Vec<T>> for Short<T> {
    fn from(mut v: Vec<T>) -> Self {
        match v.pop() {
            Some(x) if v.is_empty() => Short::One([x]),
            Some(x) => {
                v.push(x);
                Short::Many(v.into_boxed_slice())
            }
            None => Short::Many(Box::new([])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Short;

    #[test]
    fn every_length_reads_back_as_the_same_slice() {
        for n in 0..4 {
            let v: Vec<u32> = (0..n).collect();
            let s = Short::from(v.clone());
            assert_eq!(&*s, &v[..]);
            assert_eq!(matches!(s, Short::One(_)), n == 1);
        }
    }
}
