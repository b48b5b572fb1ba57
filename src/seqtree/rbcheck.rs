//! The red-black invariant checker behind the trees' `check_invariants`
//! (used by the differential tests after every operation in debug builds).
//! The walk gives up after `limit` nodes, so a tree with a cycle cannot hang a
//! test.
//!
//! What is checked: [`crate::docs::algorithms::trees`] ("How it is checked").

use core::ptr;

use super::rbtree::{child, is_red, parent, RbNode, RbRoot, LEFT, RIGHT};

impl<N: RbNode> RbRoot<N> {
    /// Checks the red-black invariants, search order and parent links of
    /// copy `copy`; returns the number of nodes or a description of the
    /// first violation. Gives up (as a violation) after `limit` nodes, so a
    /// corrupted tree with a cycle cannot hang the check.
    ///
    /// # Safety
    ///
    /// Writer contract (or exclusive access).
    pub(crate) unsafe fn check(&self, copy: usize, limit: usize) -> Result<usize, String> {
        let root = self.root_relaxed();
        if root.is_null() {
            return Ok(0);
        }
        // SAFETY: writer contract.
        unsafe {
            if !parent(root, copy).is_null() {
                return Err("root has a parent".into());
            }
            if is_red(root, copy) {
                return Err("root is red".into());
            }
            let mut count = 0;
            let mut prev: *mut N = ptr::null_mut();
            // In-order walk with an explicit stack: (node, black height so
            // far); every null leaf must see the same black height.
            let mut leaf_black: Option<usize> = None;
            let mut stack: Vec<(*mut N, usize)> = Vec::new();
            let mut n = root;
            let mut blacks = 0;
            loop {
                while !n.is_null() {
                    let b = blacks + usize::from(!is_red(n, copy));
                    for d in [LEFT, RIGHT] {
                        let c = child(n, copy, d);
                        if c.is_null() {
                            match leaf_black {
                                None => leaf_black = Some(b),
                                Some(h) if h != b => {
                                    return Err(format!("black heights {h} and {b} differ"))
                                }
                                Some(_) => {}
                            }
                        } else {
                            if parent(c, copy) != n {
                                return Err("child's parent link is wrong".into());
                            }
                            if is_red(n, copy) && is_red(c, copy) {
                                return Err("red node has a red child".into());
                            }
                        }
                    }
                    stack.push((n, b));
                    blacks = b;
                    n = child(n, copy, LEFT);
                }
                let Some((top, b)) = stack.pop() else { break };
                if !prev.is_null() && (*prev).key() >= (*top).key() {
                    return Err("keys out of order".into());
                }
                prev = top;
                count += 1;
                if count > limit {
                    return Err(format!("more than {limit} nodes reachable (a cycle?)"));
                }
                blacks = b;
                n = child(top, copy, RIGHT);
            }
            Ok(count)
        }
    }
}
