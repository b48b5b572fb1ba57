//! Shell-style globs on function names: `*` (any run of characters), `?`
//! (one character), `[abc]`, `[a-z]` and `[!abc]` (one character of, or
//! not of, a set). No escapes: function names hold none of these.

/// Checks that `glob`'s brackets are closed.
///
/// # Errors
/// A `[` without its `]`, in a few words.
pub fn check(glob: &str) -> Result<(), String> {
    let mut chars = glob.chars();
    while let Some(c) = chars.next() {
        if c == '[' && class(&mut chars.clone()).is_none() {
            return Err("a `[` in the glob has no `]`".into());
        }
        if c == '[' {
            class(&mut chars);
        }
    }
    Ok(())
}

/// A bracket class after its `[`: (negated, ranges); `chars` moved past
/// its `]`. `None` if it is not closed.
fn class(chars: &mut std::str::Chars<'_>) -> Option<(bool, Vec<(char, char)>)> {
    let mut negated = false;
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = chars.next()?;
        match c {
            '!' | '^' if first && !negated => {
                negated = true;
                continue;
            }
            // A `]` first is a member, as in the shell.
            ']' if !first => return Some((negated, ranges)),
            _ => {}
        }
        first = false;
        let mut ahead = chars.clone();
        match (ahead.next(), ahead.next()) {
            (Some('-'), Some(hi)) if hi != ']' => {
                ranges.push((c, hi));
                *chars = ahead;
            }
            _ => ranges.push((c, c)),
        }
    }
}

/// Whether `name` matches `glob` (the whole name).
pub fn matches(glob: &str, name: &str) -> bool {
    let g: Vec<char> = glob.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point for the last `*`.
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() {
            match g[gi] {
                '*' => {
                    star = Some((gi, ni));
                    gi += 1;
                    continue;
                }
                '?' => {
                    gi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    let rest: String = g[gi + 1..].iter().collect();
                    let mut it = rest.chars();
                    if let Some((neg, ranges)) = class(&mut it) {
                        let hit = ranges.iter().any(|&(lo, hi)| lo <= n[ni] && n[ni] <= hi);
                        if hit != neg {
                            gi = g.len() - it.count();
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        gi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    gi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sg, sn)) => {
                gi = sg + 1;
                ni = sn + 1;
                star = Some((sg, sn + 1));
            }
            None => return false,
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_in_the_shell() {
        assert!(matches("str*", "strtol"));
        assert!(matches("str*", "str"));
        assert!(!matches("str*", "xstrtol"));
        assert!(matches("*alloc", "malloc"));
        assert!(matches("*alloc", "__libc_calloc"));
        assert!(!matches("*alloc", "malloc_usable_size"));
        assert!(matches("f?o", "foo"));
        assert!(!matches("f?o", "fo"));
        assert!(matches("fx_[ab]*", "fx_alpha"));
        assert!(matches("fx_[a-c]*", "fx_cat"));
        assert!(!matches("fx_[!a-c]*", "fx_cat"));
        assert!(matches("fx_[!a-c]*", "fx_dog"));
        assert!(matches("*", ""));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
    }

    #[test]
    fn an_open_bracket_is_refused() {
        assert!(check("str[ab").is_err());
        assert!(check("str[ab]*").is_ok());
        assert!(check("[]]x").is_ok());
    }
}
