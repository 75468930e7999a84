//! Fuzzing as properties (proptest), run with the unit tests: what the parsers and decoders
//! are fed comes from seeds (the API fixtures in `src/inventory/*/fixtures` and the extra
//! seeds in `fuzz/corpus/`), mutated byte by byte, or built as JSON out of the field names
//! the decoders know. Each property says "no panic" at least; most say more.
//!
//! The case counts keep the whole set to a few seconds in a debug build; set
//! `OBSERVER_FUZZ_CASES` to run every property longer (e.g. 100000 before a release).
//! A failure is saved under `proptest-regressions/` (commit it) and becomes a unit test
//! next to the code it broke.

use std::path::{Path, PathBuf};

use proptest::{prelude::*, sample::Index, test_runner::Config};

/// `cases` cases, or `OBSERVER_FUZZ_CASES` when set.
pub fn config(cases: u32) -> Config {
    let cases = std::env::var("OBSERVER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        // Shrinking a mutated document can take long; a failure is found, then shown small.
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The fixtures of `platform` (`src/inventory/<platform>/fixtures`) and the extra seeds in
/// `fuzz/corpus/<platform>/`, as bytes.
pub fn json_seeds(platform: &str) -> Vec<Vec<u8>> {
    let fixtures = manifest_dir()
        .join("src/inventory")
        .join(platform)
        .join("fixtures");
    let corpus = manifest_dir().join("fuzz/corpus").join(platform);
    let seeds: Vec<Vec<u8>> = files_in(&fixtures)
        .into_iter()
        .chain(files_in(&corpus))
        .map(|p| std::fs::read(&p).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "no seeds for {platform}");
    seeds
}

/// The lines of `fuzz/corpus/<name>.txt` that are not blank or `#` comments.
pub fn line_seeds(name: &str) -> Vec<String> {
    let path = manifest_dir()
        .join("fuzz/corpus")
        .join(format!("{name}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let seeds: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {}", path.display());
    seeds
}

/// Tokens worth inserting: JSON structure, numbers at the edges of their types, escapes, and
/// the suffixes and separators the parsers look for.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "null",
    "true",
    "false",
    "\"\"",
    "0",
    "-1",
    "-0",
    "1e999",
    "-1e999",
    "1.5",
    "18446744073709551616",
    "9223372036854775808",
    "-9223372036854775809",
    "170141183460469231731687303715",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "8Ei",
    "Ei",
    "m",
    "n",
    "e-",
    "e+308",
    "999",
    ".",
    "/",
    "//",
    "..",
    "-",
    "_",
    ".slice",
    ".scope",
    "docker-",
    "cri-containerd-",
    "crio-",
    "crio-conmon-",
    "pod",
    "kubepods",
    "burstable",
    "besteffort",
    "ecs",
    "ecstasks-",
    ":cri-containerd:",
    "ms",
    "s",
    "h",
    "d",
    "y",
    " ",
    "\n",
    "\u{0}",
    "é",
    "🚀",
];

/// One change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, &'static str),
    Delete(Index, u8),
    Truncate(Index),
    /// Copy a range to another place: repeats a structure (a second pod, a nested array).
    Duplicate(Index, Index, u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), prop::sample::select(TOKENS)).prop_map(|(i, t)| Mutation::Insert(i, t)),
        (any::<Index>(), 1..16u8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<Index>(), 1..512u16)
            .prop_map(|(from, to, n)| Mutation::Duplicate(from, to, n)),
    ]
}

impl Mutation {
    fn apply(&self, b: &mut Vec<u8>) {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match self {
            Self::Flip(i, byte) if !b.is_empty() => {
                let i = i.index(b.len());
                b[i] = *byte;
            }
            Self::Flip(..) => {}
            Self::Insert(i, token) => {
                let i = at(i, b.len());
                b.splice(i..i, token.bytes());
            }
            Self::Delete(i, n) => {
                let i = at(i, b.len()).min(b.len());
                let end = (i + usize::from(*n)).min(b.len());
                b.drain(i..end);
            }
            Self::Truncate(i) => {
                let i = at(i, b.len()).min(b.len());
                b.truncate(i);
            }
            Self::Duplicate(from, to, n) => {
                if b.is_empty() {
                    return;
                }
                let from = from.index(b.len());
                let end = (from + usize::from(*n)).min(b.len());
                let piece = b[from..end].to_vec();
                let to = to.index(b.len() + 1);
                b.splice(to..to, piece);
            }
        }
    }
}

/// A seed, as is or with up to `max` mutations.
pub fn mutated(seeds: Vec<Vec<u8>>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    let seeds = std::sync::Arc::new(seeds);
    let count = seeds.len();
    (0..count, prop::collection::vec(mutation(), 0..=max)).prop_map(move |(i, mutations)| {
        let mut bytes = seeds[i].clone();
        for m in &mutations {
            m.apply(&mut bytes);
        }
        bytes
    })
}

/// [`mutated`] for text seeds: the mutated bytes, lossily read back as a string.
pub fn mutated_text(seeds: Vec<String>, max: usize) -> impl Strategy<Value = String> {
    mutated(seeds.into_iter().map(String::into_bytes).collect(), max)
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A string that is mostly made of `parts` (the words a parser looks for), with some
/// arbitrary characters between them.
pub fn words(parts: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(parts).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
        1 => "[0-9a-f]{1,64}",
    ];
    prop::collection::vec(piece, 0..=max).prop_map(|pieces| pieces.concat())
}

/// JSON whose object keys come from `keys` (the fields a decoder reads) and whose leaves are
/// of every type: documents that get past the syntax and into the decoders' logic.
pub fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(TOKENS).prop_map(Value::from),
        "[0-9a-f]{64}".prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(keys).prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(keys), inner), 0..8).prop_map(|fields| {
                Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

#[cfg(test)]
mod tests {
    use proptest::strategy::ValueTree;

    use super::*;

    #[test]
    fn every_seed_set_loads() {
        for platform in ["ecs", "kubernetes", "docker"] {
            assert!(json_seeds(platform).len() >= 2, "{platform}");
        }
        for name in ["cgroup_paths", "quantities", "durations", "roles"] {
            assert!(line_seeds(name).len() >= 5, "{name}");
        }
    }

    #[test]
    fn mutations_stay_in_bounds() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = mutated(vec![Vec::new(), b"{}".to_vec()], 8);
        for _ in 0..2000 {
            strategy.new_tree(&mut runner).unwrap().current();
        }
    }
}
