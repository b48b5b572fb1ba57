//! Symbol resolution: names to addresses, and addresses to the function that
//! contains them.
//!
//! The registry needs both directions. `name + offset` targets are turned
//! into addresses with [`SymbolResolver::lookup`]; every probe address is
//! then checked to lie on an instruction boundary by decoding from the start
//! of the function [`SymbolResolver::function_containing`] reports. The
//! caller supplies the resolver: a [`SymbolTable`] built by hand (tests, JIT
//! code), or one over the process's ELF symbols (the live runtime).

use std::collections::HashMap;

use crate::probes::ProbeError;

/// A function: its first byte and its size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Symbol {
    /// Address of the function's first instruction.
    pub start: u64,
    /// Size in bytes (at least 1).
    pub size: u64,
}

impl Symbol {
    /// One past the function's last byte (saturating).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }

    /// Whether `addr` is inside the function.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }

    /// The address `offset` bytes into this function, which `name` names.
    ///
    /// # Errors
    /// [`ProbeError::OffsetPastEnd`] if `offset` is not inside the function
    /// (`offset >= size`, or an address that would wrap): such a target
    /// would land in whatever follows the function.
    ///
    /// ```
    /// use rcu_registry::probes::resolve::Symbol;
    /// use rcu_registry::probes::ProbeError;
    ///
    /// let f = Symbol { start: 0x1000, size: 16 };
    /// assert_eq!(f.offset_address("f", 15), Ok(0x100f));
    /// for offset in [16, u64::MAX] {
    ///     assert_eq!(
    ///         f.offset_address("f", offset),
    ///         Err(ProbeError::OffsetPastEnd { name: "f".into(), size: 16, offset })
    ///     );
    /// }
    /// ```
    pub fn offset_address(&self, name: &str, offset: u64) -> Result<u64, ProbeError> {
        match self.start.checked_add(offset) {
            Some(addr) if offset < self.size => Ok(addr),
            _ => Err(ProbeError::OffsetPastEnd {
                name: name.to_string(),
                size: self.size,
                offset,
            }),
        }
    }
}

/// Resolves function names and finds the function around an address.
pub trait SymbolResolver: Send + Sync {
    /// The function called `name`.
    fn lookup(&self, name: &str) -> Option<Symbol>;

    /// The function whose bytes include `addr`.
    fn function_containing(&self, addr: u64) -> Option<Symbol>;

    /// The function called `name`, or why there is none.
    ///
    /// The default answers [`ProbeError::UnknownSymbol`] when
    /// [`lookup`](Self::lookup) finds nothing; a resolver that can tell
    /// more (a name defined in several objects) overrides it.
    ///
    /// # Errors
    /// [`ProbeError::UnknownSymbol`], or what the resolver reports.
    fn resolve(&self, name: &str) -> Result<Symbol, ProbeError> {
        self.lookup(name).ok_or_else(|| ProbeError::UnknownSymbol {
            name: name.to_string(),
        })
    }
}

/// A resolver over a list of `(name, start, size)` functions.
///
/// ```
/// use rcu_registry::probes::resolve::{Symbol, SymbolResolver, SymbolTable};
///
/// let mut table = SymbolTable::new();
/// table.insert("main", 0x1000, 0x40);
/// table.insert("helper", 0x1040, 0x10);
/// assert_eq!(table.lookup("helper"), Some(Symbol { start: 0x1040, size: 0x10 }));
/// assert_eq!(table.function_containing(0x1047).map(|s| s.start), Some(0x1040));
/// assert_eq!(table.function_containing(0x1050), None);
/// ```
#[derive(Clone, Debug, Default)]
pub struct SymbolTable {
    /// Functions sorted by start address.
    by_addr: Vec<Symbol>,
    by_name: HashMap<String, Symbol>,
}

impl SymbolTable {
    /// An empty table.
    pub fn new() -> Self {
        SymbolTable::default()
    }

    /// Adds (or replaces) the function `name` at `start`, `size` bytes long.
    /// A zero size is stored as 1.
    pub fn insert(&mut self, name: impl Into<String>, start: u64, size: u64) -> &mut Self {
        let sym = Symbol {
            start,
            size: size.max(1),
        };
        if let Some(old) = self.by_name.insert(name.into(), sym) {
            self.by_addr.retain(|s| *s != old);
        }
        let at = self.by_addr.partition_point(|s| s.start < start);
        self.by_addr.insert(at, sym);
        self
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl SymbolResolver for SymbolTable {
    fn lookup(&self, name: &str) -> Option<Symbol> {
        self.by_name.get(name).copied()
    }

    fn function_containing(&self, addr: u64) -> Option<Symbol> {
        let at = self.by_addr.partition_point(|s| s.start <= addr);
        let sym = *self.by_addr.get(at.checked_sub(1)?)?;
        sym.contains(addr).then_some(sym)
    }
}
