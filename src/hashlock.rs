//! Hashed lock arrays: stripes of locks, each on its own cache line, indexed
//! by a hash of a strictly typed key.
