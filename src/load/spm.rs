//! SentencePiece unigram models (`.spm` / `.model` files), read and applied in Rust.
//!
//! This follows the reference implementation (google/sentencepiece) step by step, because
//! Marian models are trained on its exact segmentation: the precompiled normalization
//! charsmap applied by longest prefix, whitespace handling (dummy prefix, removal of extra
//! spaces, escaping to `▁`), Viterbi over a lattice in f32 with ties going to the earlier
//! split, an unknown-piece penalty of 10 below the lowest score, and runs of unknown
//! characters merged into one piece.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Largest SentencePiece model file read (released Marian models' are under 1 MiB).
pub const MAX_MODEL_BYTES: u64 = 256 << 20;

/// The whitespace meta symbol, U+2581.
pub const SPACE_SYMBOL: char = '\u{2581}';

/// A piece's type, as the model file stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    fn from_proto(v: u64) -> Result<Self> {
        Ok(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => bail!("unknown sentencepiece piece type {v}"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// One piece of an encoding: its (normalized) text and whether it is the unknown piece.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub unknown: bool,
}

/// A SentencePiece unigram model.
#[derive(Debug, Clone)]
pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// Pieces the lattice may use (normal, user-defined, unused), by text.
    lookup: HashMap<String, u32>,
    max_piece_chars: usize,
    min_score: f32,
    max_score: f32,
    normalizer: Normalizer,
}

impl SentencePiece {
    pub fn open(path: &Path) -> Result<Self> {
        super::sniff::ensure_not_dangling(path)?;
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if len > MAX_MODEL_BYTES {
            bail!(
                "{} is {len} bytes, more than the {MAX_MODEL_BYTES} accepted for a SentencePiece model",
                path.display()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| {
            format!(
                "{} is not a valid SentencePiece model (re-download the tokenizer files)",
                path.display()
            )
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut pieces = Vec::new();
        let mut trainer = None;
        let mut norm = None;
        for field in ProtoReader::new(bytes) {
            match field? {
                (1, Value::Bytes(b)) => pieces.push(parse_piece(b)?),
                (2, Value::Bytes(b)) => trainer = Some(b),
                (3, Value::Bytes(b)) => norm = Some(b),
                _ => {}
            }
        }
        if pieces.is_empty() {
            bail!("the model has no pieces");
        }
        let mut treat_whitespace_as_suffix = false;
        if let Some(t) = trainer {
            for field in ProtoReader::new(t) {
                match field? {
                    (3, Value::Varint(v)) if v != 1 => {
                        bail!("model_type {v} is not unigram; only unigram SentencePiece models are supported")
                    }
                    (24, Value::Varint(v)) => treat_whitespace_as_suffix = v != 0,
                    (35, Value::Varint(v)) if v != 0 => {
                        bail!("byte-fallback SentencePiece models are not supported")
                    }
                    _ => {}
                }
            }
        }
        let normalizer = Normalizer::from_proto(norm, treat_whitespace_as_suffix)?;
        let (mut min_score, mut max_score) = (f32::MAX, f32::MIN_POSITIVE);
        let mut lookup = HashMap::new();
        let mut max_piece_chars = 1;
        for (id, p) in pieces.iter().enumerate() {
            if p.kind == PieceKind::Normal {
                min_score = min_score.min(p.score);
                max_score = max_score.max(p.score);
            }
            if matches!(
                p.kind,
                PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused
            ) {
                lookup.insert(p.text.clone(), id as u32);
                max_piece_chars = max_piece_chars.max(p.text.chars().count());
            }
        }
        if !pieces.iter().any(|p| p.kind == PieceKind::Unknown) {
            bail!("the model has no unknown piece");
        }
        let mut spm = Self {
            pieces,
            lookup,
            max_piece_chars,
            min_score,
            max_score,
            normalizer,
        };
        // An empty user-defined piece would match everywhere without consuming input.
        spm.normalizer.user_defined = spm
            .pieces
            .iter()
            .filter(|p| p.kind == PieceKind::UserDefined && !p.text.is_empty())
            .map(|p| p.text.clone())
            .collect();
        Ok(spm)
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The normalized form of `text`, as the segmenter sees it.
    pub fn normalize(&self, text: &str) -> String {
        self.normalizer.normalize(text)
    }

    /// Segments `text` into pieces, the way `SentencePieceProcessor.encode(text, out_type=str)` does.
    pub fn encode(&self, text: &str) -> Vec<Segment> {
        let normalized = self.normalize(text);
        self.segment(&normalized)
    }

    fn segment(&self, normalized: &str) -> Vec<Segment> {
        let bounds: Vec<usize> = normalized
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(normalized.len()))
            .collect();
        let n = bounds.len() - 1;
        if n == 0 {
            return Vec::new();
        }
        let unk_score = self.min_score - 10.0;
        // best[e]: (score, start, is_unknown) of the best path ending at char e.
        let mut best: Vec<Option<(f32, usize, bool)>> = vec![None; n + 1];
        best[0] = Some((0.0, 0, false));
        for b in 0..n {
            let Some((base, _, _)) = best[b] else {
                continue;
            };
            let mut has_single = false;
            let mut relax = |e: usize, score: f32, unknown: bool| {
                let cand = base + score;
                if best[e].is_none_or(|(s, _, _)| cand > s) {
                    best[e] = Some((cand, b, unknown));
                }
            };
            for len in 1..=self.max_piece_chars.min(n - b) {
                let s = &normalized[bounds[b]..bounds[b + len]];
                let Some(&id) = self.lookup.get(s) else {
                    continue;
                };
                let p = &self.pieces[id as usize];
                let score = match p.kind {
                    PieceKind::Unused => continue,
                    PieceKind::UserDefined => len as f32 * self.max_score - 0.1,
                    _ => p.score,
                };
                has_single |= len == 1;
                relax(b + len, score, false);
            }
            if !has_single {
                relax(b + 1, unk_score, true);
            }
        }
        let mut spans = Vec::new();
        let mut e = n;
        while e > 0 {
            let (_, b, unknown) =
                best[e].expect("every position is reachable through unknown pieces");
            spans.push((b, e, unknown));
            e = b;
        }
        spans.reverse();
        let mut out: Vec<Segment> = Vec::with_capacity(spans.len());
        for (b, e, unknown) in spans {
            let text = &normalized[bounds[b]..bounds[e]];
            match out.last_mut() {
                // Runs of unknown characters become one piece, as sentencepiece does.
                Some(prev) if unknown && prev.unknown => prev.text.push_str(text),
                _ => out.push(Segment {
                    text: text.to_string(),
                    unknown,
                }),
            }
        }
        out
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece> {
    let mut p = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceKind::Normal,
    };
    for field in ProtoReader::new(bytes) {
        match field? {
            (1, Value::Bytes(b)) => {
                p.text = String::from_utf8(b.to_vec()).context("a piece is not valid UTF-8")?
            }
            (2, Value::Fixed32(v)) => p.score = f32::from_bits(v),
            (3, Value::Varint(v)) => p.kind = PieceKind::from_proto(v)?,
            _ => {}
        }
    }
    Ok(p)
}

/// Text normalization as sentencepiece's `Normalizer` does it.
#[derive(Debug, Clone)]
struct Normalizer {
    charsmap: Option<CharsMap>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
    /// User-defined pieces pass through unnormalized.
    user_defined: Vec<String>,
}

impl Normalizer {
    fn from_proto(spec: Option<&[u8]>, treat_whitespace_as_suffix: bool) -> Result<Self> {
        let mut n = Self {
            charsmap: None,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            treat_whitespace_as_suffix,
            user_defined: Vec::new(),
        };
        for field in ProtoReader::new(spec.unwrap_or(&[])) {
            match field? {
                (2, Value::Bytes(b)) if !b.is_empty() => n.charsmap = Some(CharsMap::parse(b)?),
                (3, Value::Varint(v)) => n.add_dummy_prefix = v != 0,
                (4, Value::Varint(v)) => n.remove_extra_whitespaces = v != 0,
                (5, Value::Varint(v)) => n.escape_whitespaces = v != 0,
                _ => {}
            }
        }
        Ok(n)
    }

    /// The replacement for the longest normalizable prefix of `input`, and its length in bytes.
    fn normalize_prefix<'a>(&'a self, input: &'a str) -> (&'a str, usize) {
        if let Some(len) = self
            .user_defined
            .iter()
            .filter(|u| input.starts_with(u.as_str()))
            .map(|u| u.len())
            .max()
        {
            return (&input[..len], len);
        }
        // A corrupt map could match part of a character: such a match is ignored.
        if let Some((len, rep)) = self
            .charsmap
            .as_ref()
            .and_then(|m| m.longest_prefix(input.as_bytes()))
            .filter(|&(len, _)| input.is_char_boundary(len))
        {
            return (rep, len);
        }
        let len = input.chars().next().map_or(0, char::len_utf8);
        (&input[..len], len)
    }

    /// [`Self::normalize_prefix`], always consuming at least one character of a non-empty
    /// input (so the normalization loops end whatever the model file says).
    fn next_prefix<'a>(&'a self, input: &'a str) -> (&'a str, usize) {
        let (rep, len) = self.normalize_prefix(input);
        if len == 0 && !input.is_empty() {
            let one = input.chars().next().map_or(0, char::len_utf8);
            return (&input[..one], one);
        }
        (rep, len)
    }

    fn normalize(&self, text: &str) -> String {
        let mut input = text;
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (rep, len) = self.next_prefix(input);
                if rep != " " {
                    break;
                }
                input = &input[len..];
            }
        }
        let mut out = String::with_capacity(input.len() * 3);
        if input.is_empty() {
            return out;
        }
        let space = if self.escape_whitespaces {
            SPACE_SYMBOL.to_string()
        } else {
            " ".to_string()
        };
        if !self.treat_whitespace_as_suffix && self.add_dummy_prefix {
            out.push_str(&space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (rep, len) = self.next_prefix(input);
            let mut rep = rep;
            while prev_space && rep.starts_with(' ') {
                rep = &rep[1..];
            }
            if !rep.is_empty() {
                for c in rep.chars() {
                    if c == ' ' && self.escape_whitespaces {
                        out.push(SPACE_SYMBOL);
                    } else {
                        out.push(c);
                    }
                }
                prev_space = rep.ends_with(' ');
            }
            input = &input[len..];
            if !self.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space.as_str()) {
                out.truncate(out.len() - space.len());
            }
        }
        if self.treat_whitespace_as_suffix && self.add_dummy_prefix {
            out.push_str(&space);
        }
        out
    }
}

/// sentencepiece's precompiled normalization map: a Darts double-array trie over the input
/// bytes whose values point into a block of NUL-terminated replacement strings.
#[derive(Debug, Clone)]
struct CharsMap {
    units: Vec<u32>,
    replacements: Vec<u8>,
}

impl CharsMap {
    fn parse(blob: &[u8]) -> Result<Self> {
        let trie_len = blob
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .context("the precompiled charsmap is truncated")?;
        if trie_len % 4 != 0 || 4 + trie_len >= blob.len() {
            bail!("the precompiled charsmap's trie size {trie_len} does not fit its blob");
        }
        let units = blob[4..4 + trie_len]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            units,
            replacements: blob[4 + trie_len..].to_vec(),
        })
    }

    /// The longest key that prefixes `key`: its length and its replacement.
    fn longest_prefix(&self, key: &[u8]) -> Option<(usize, &str)> {
        let unit = |pos: usize| self.units.get(pos).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let label = |u: u32| u & ((1 << 31) | 0xFF);
        let has_leaf = |u: u32| (u >> 8) & 1 == 1;
        let mut pos = offset(unit(0)?);
        let mut found = None;
        for (i, &c) in key.iter().enumerate() {
            pos ^= c as usize;
            let u = unit(pos)?;
            if label(u) != c as u32 {
                break;
            }
            pos ^= offset(u);
            if has_leaf(u) {
                let value = (unit(pos)? & ((1 << 31) - 1)) as usize;
                found = Some((i + 1, value));
            }
        }
        let (len, start) = found?;
        let rest = self.replacements.get(start..)?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).ok().map(|s| (len, s))
    }
}

/// A protobuf wire-format field value (only what model files use).
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates over the (field number, value) pairs of one protobuf message.
struct ProtoReader<'a> {
    buf: &'a [u8],
    failed: bool,
}

impl<'a> ProtoReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, failed: false }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().context("truncated varint")?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            bail!("field runs past the end of the message");
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u32, Value<'a>)> {
        let key = self.varint()?;
        let number = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into()?)),
            w => bail!("unsupported protobuf wire type {w}"),
        };
        Ok((number, value))
    }
}

impl<'a> Iterator for ProtoReader<'a> {
    type Item = Result<(u32, Value<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() || self.failed {
            return None;
        }
        let r = self.field();
        self.failed = r.is_err();
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a protobuf field (tests build tiny models by hand).
    fn field(num: u32, wire: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((num << 3) | wire as u32) as u8];
        if wire == 2 {
            out.push(payload.len() as u8);
        }
        out.extend_from_slice(payload);
        out
    }

    fn piece(text: &str, score: f32, kind: u8) -> Vec<u8> {
        let mut p = field(1, 2, text.as_bytes());
        p.extend(field(2, 5, &score.to_le_bytes()));
        p.extend(field(3, 0, &[kind]));
        field(1, 2, &p)
    }

    fn tiny() -> SentencePiece {
        let mut m = Vec::new();
        m.extend(piece("<unk>", 0.0, 2));
        m.extend(piece("</s>", 0.0, 3));
        for (t, s) in [
            ("▁", -2.0),
            ("▁ab", -3.0),
            ("▁a", -1.0),
            ("b", -1.5),
            ("c", -4.0),
        ] {
            m.extend(piece(t, s, 1));
        }
        SentencePiece::from_bytes(&m).unwrap()
    }

    #[test]
    fn viterbi_picks_the_best_total_score_by_hand() {
        let spm = tiny();
        // "▁ab": "▁ab" scores -3.0, "▁a"+"b" scores -2.5: the split wins.
        let seg: Vec<String> = spm.encode("ab").into_iter().map(|s| s.text).collect();
        assert_eq!(seg, ["▁a", "b"]);
    }

    #[test]
    fn whitespace_is_trimmed_collapsed_and_escaped() {
        let spm = tiny();
        assert_eq!(spm.normalize("  a   b  "), "▁a▁b");
        assert_eq!(spm.normalize("   "), "");
        assert!(spm.encode("").is_empty());
    }

    #[test]
    fn unknown_runs_merge_into_one_piece() {
        let spm = tiny();
        let seg = spm.encode("axyb");
        let texts: Vec<&str> = seg.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["▁a", "xy", "b"]);
        assert!(seg[1].unknown && !seg[0].unknown);
    }

    #[test]
    fn user_defined_pieces_always_win_and_skip_normalization() {
        let mut m = Vec::new();
        m.extend(piece("<unk>", 0.0, 2));
        for (t, sc) in [
            ("▁a", -1.0),
            ("b", -1.0),
            ("<", -0.5),
            ("x", -0.5),
            (">", -0.5),
        ] {
            m.extend(piece(t, sc, 1));
        }
        m.extend(piece("<x>", 0.0, 4));
        let spm = SentencePiece::from_bytes(&m).unwrap();
        let seg: Vec<String> = spm.encode("a<x>b").into_iter().map(|s| s.text).collect();
        assert_eq!(seg, ["▁a", "<x>", "b"]);
    }

    #[test]
    fn an_empty_user_defined_piece_does_not_stall_normalization() {
        let mut m = piece("<unk>", 0.0, 2);
        m.extend(piece("▁a", -1.0, 1));
        m.extend(piece("", 0.0, 4));
        let spm = SentencePiece::from_bytes(&m).unwrap();
        assert_eq!(spm.normalize("  a  "), "▁a");
        assert_eq!(spm.encode("a").len(), 1);
    }

    #[test]
    fn corrupt_models_are_errors() {
        assert!(SentencePiece::from_bytes(b"\x0a\xff").is_err());
        assert!(SentencePiece::from_bytes(&[]).is_err());
    }
}
