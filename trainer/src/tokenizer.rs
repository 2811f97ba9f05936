//! Text <-> token ids for the model, built either from a GGUF file's metadata or from a Hugging
//! Face `tokenizer.json`.
//!
//! A GGUF file does not carry a `tokenizer.json`: it carries the vocabulary, the merges, the token
//! types and the *name* of the pre-tokenizer (`tokenizer.ggml.pre`) that llama.cpp knows. This
//! module turns that name into the same `tokenizers` pipeline the model's own `tokenizer.json` has,
//! and refuses names it does not know instead of guessing: a wrong pre-tokenizer gives plausible but
//! wrong ids (candle's generic builder adds a prefix space for SmolLM2's `smollm`, for example).

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Errors building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key the tokenizer needs is absent from the GGUF file.
    #[error("GGUF metadata has no `{0}` (a tokenizer needs it)")]
    MissingKey(String),
    /// A metadata key has the wrong type or an impossible value.
    #[error("GGUF metadata `{key}`: expected {expected}")]
    BadMetadata { key: String, expected: String },
    /// The file describes a tokenizer this module cannot reproduce faithfully.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// Reading `tokenizer.json` or its companion files failed.
    #[error("cannot read {path}: {message}")]
    File { path: PathBuf, message: String },
    /// An error from the `tokenizers` crate while building, encoding or decoding.
    #[error("tokenizer: {0}")]
    Backend(String),
}

fn backend(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Backend(e.to_string())
}

/// A special token: its id and its text (for example `2` and `<|im_end|>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

/// The model's tokenizer plus what the model file says about how to use it: the special tokens,
/// whether a BOS token is prepended, and the chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Llama 3's split pattern (from its `tokenizer.json`; digits in groups of up to three).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern (from its `tokenizer.json`; single digits).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The byte-level pre-tokenizer pipelines this module reproduces, by llama.cpp `tokenizer.ggml.pre`
/// name. Each is the pipeline of the corresponding model's Hugging Face `tokenizer.json`.
enum BytePre {
    /// `smollm`, `starcoder`: `Digits(individual_digits) -> ByteLevel(no prefix space, GPT-2 regex)`
    /// (llama.cpp: `\p{N}` then the GPT-2 pattern).
    DigitsThenGpt2,
    /// `gpt2`, `gpt-2`: `ByteLevel(no prefix space, GPT-2 regex)`.
    Gpt2,
    /// `llama3`, `llama-bpe`, ...: `Split(Llama 3 regex) -> ByteLevel(no regex)`.
    Llama3,
    /// `qwen2`: NFC, then `Split(Qwen2 regex) -> ByteLevel(no regex)`.
    Qwen2,
}

impl BytePre {
    fn from_name(name: &str) -> Option<BytePre> {
        Some(match name {
            "smollm" | "starcoder" => BytePre::DigitsThenGpt2,
            "gpt2" | "gpt-2" => BytePre::Gpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => BytePre::Llama3,
            "qwen2" | "deepseek-r1-qwen" => BytePre::Qwen2,
            _ => return None,
        })
    }

    fn pre_tokenizer(&self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(backend)?;
            Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into())
        };
        Ok(match self {
            BytePre::DigitsThenGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
            }
            BytePre::Gpt2 => ByteLevel::new(false, true, true).into(),
            BytePre::Llama3 => split_then_bytes(LLAMA3_SPLIT)?,
            BytePre::Qwen2 => split_then_bytes(QWEN2_SPLIT)?,
        })
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    ct.metadata.get(key)
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Result<Option<u32>, TokenizerError> {
    use gguf_file::Value::*;
    let Some(v) = meta(ct, key) else { return Ok(None) };
    let id = match v {
        U8(x) => Some(u32::from(*x)),
        U16(x) => Some(u32::from(*x)),
        U32(x) => Some(*x),
        U64(x) => u32::try_from(*x).ok(),
        I8(x) => u32::try_from(*x).ok(),
        I16(x) => u32::try_from(*x).ok(),
        I32(x) => u32::try_from(*x).ok(),
        I64(x) => u32::try_from(*x).ok(),
        _ => None,
    };
    id.map(Some).ok_or_else(|| TokenizerError::BadMetadata {
        key: key.to_string(),
        expected: format!("a non-negative integer, found {v:?}"),
    })
}

fn meta_bool(ct: &gguf_file::Content, key: &str) -> Result<Option<bool>, TokenizerError> {
    match meta(ct, key) {
        None => Ok(None),
        Some(v) => v
            .to_bool()
            .map(Some)
            .map_err(|_| TokenizerError::BadMetadata { key: key.to_string(), expected: "a boolean".to_string() }),
    }
}

fn meta_string(ct: &gguf_file::Content, key: &str) -> Result<Option<String>, TokenizerError> {
    match meta(ct, key) {
        None => Ok(None),
        Some(v) => v
            .to_string()
            .map(|s| Some(s.clone()))
            .map_err(|_| TokenizerError::BadMetadata { key: key.to_string(), expected: "a string".to_string() }),
    }
}

fn meta_array<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a [gguf_file::Value], TokenizerError> {
    let v = meta(ct, key).ok_or_else(|| TokenizerError::MissingKey(key.to_string()))?;
    v.to_vec()
        .map(|v| v.as_slice())
        .map_err(|_| TokenizerError::BadMetadata { key: key.to_string(), expected: "an array".to_string() })
}

fn meta_strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, TokenizerError> {
    meta_array(ct, key)?
        .iter()
        .map(|v| {
            v.to_string().cloned().map_err(|_| TokenizerError::BadMetadata {
                key: key.to_string(),
                expected: "an array of strings".to_string(),
            })
        })
        .collect()
}

fn special(tokens: &[String], id: Option<u32>) -> Option<SpecialToken> {
    let id = id?;
    tokens.get(id as usize).map(|text| SpecialToken { id, text: text.clone() })
}

/// The file's merges, `left right` per entry.
fn gguf_merges(ct: &gguf_file::Content) -> Result<Vec<(String, String)>, TokenizerError> {
    meta_strings(ct, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.merges".to_string(),
                expected: format!("pairs `left right`, found `{m}`"),
            }),
        })
        .collect()
}

/// Byte-level BPE: the vocabulary, the merges and the pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_tokenizer(ct: &gguf_file::Content, tokens: &[String]) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let pre_name = meta_string(ct, "tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into());
    let pre = BytePre::from_name(&pre_name).ok_or_else(|| {
        TokenizerError::Unsupported(format!(
            "pre-tokenizer `{pre_name}` (tokenizer.ggml.pre); supported: smollm, starcoder, \
             gpt2, llama3 (llama-bpe, llama-v3, smaug-bpe, dbrx, falcon3), qwen2; \
             for other models pass a Hugging Face folder with tokenizer.json"
        ))
    })?;
    let merges = gguf_merges(ct)?;

    // Every regular token of a byte-level vocabulary is spelt in GPT-2's byte alphabet; some
    // converters store a token made of raw spaces or other text as is. Respell those in the
    // alphabet, as transformers does, so they still match what the pre-tokenizer produces.
    let alphabet = ByteLevel::alphabet();
    let byte_spelling = |t: &str| -> String {
        let mut pre = tokenizers::PreTokenizedString::from(t);
        // Only the spelling is wanted: a ByteLevel without regex maps bytes to characters.
        let _ = tokenizers::PreTokenizer::pre_tokenize(&ByteLevel::new(false, false, false), &mut pre);
        pre.get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let spelt = if t.chars().all(|c| alphabet.contains(&c)) { t.clone() } else { byte_spelling(t) };
            (spelt, i as u32)
        })
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(backend)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    if let BytePre::Qwen2 = pre {
        inner.with_normalizer(Some(NFC)).map_err(backend)?;
    }
    inner.with_pre_tokenizer(Some(pre.pre_tokenizer()?));
    inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    Ok(inner)
}

/// SentencePiece BPE as transformers' `LlamaTokenizer` rebuilds it from a GGUF: spaces become
/// `▁` with one prepended to the first piece, unknown characters fall back to `<0xXX>` byte
/// tokens, and decoding undoes both.
fn sentencepiece_tokenizer(
    ct: &gguf_file::Content,
    tokens: &[String],
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let merges = if meta(ct, "tokenizer.ggml.merges").is_some() {
        gguf_merges(ct)?
    } else {
        let scores = meta_array(ct, "tokenizer.ggml.scores")?
            .iter()
            .map(|v| {
                v.to_f32().map_err(|_| TokenizerError::BadMetadata {
                    key: "tokenizer.ggml.scores".to_string(),
                    expected: "an array of f32".to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if scores.len() != tokens.len() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.scores".to_string(),
                expected: format!("{} entries (one per token), found {}", tokens.len(), scores.len()),
            });
        }
        merges_from_scores(tokens, &scores)
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true).build().map_err(backend)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(backend)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ];
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// BPE merges implied by a SentencePiece vocabulary, in the order transformers'
/// `generate_merges` gives them: every split of a token into two vocabulary tokens, best merged
/// score first, then longer left and right parts; ties keep vocabulary order.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    // Python dicts: the last id of a repeated token wins, its first position keeps its place.
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let score = scores[ids[t.as_str()]];
        let mut local: Vec<(&str, &str, f32)> = t
            .char_indices()
            .skip(1)
            .map(|(at, _)| (&t[..at], &t[at..], score))
            .filter(|(l, r, _)| ids.contains_key(l) && ids.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0).then(kb.1.cmp(&ka.1)).then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes, the way transformers builds it from the same
    /// file (and llama.cpp tokenises).
    ///
    /// Supported vocabularies:
    /// - byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizers `smollm`,
    ///   `starcoder`, `gpt2`/`gpt-2`, the Llama 3 family (`llama3`, `llama-bpe`, ...) and `qwen2`;
    /// - SentencePiece BPE (`llama`: Llama 2, CodeLlama, Mistral, ...) with byte fallback and a `▁`
    ///   prefix on the first piece; merges are the file's or derived from the token scores.
    ///
    /// Control tokens (type 3) become special added tokens, so `<|im_start|>` in a text encodes to
    /// its single id; user-defined tokens (type 4) become plain added tokens. A BOS token is
    /// prepended where `tokenizer.ggml.add_bos_token` says so (default: yes for SentencePiece, no
    /// for byte-level). Other vocabularies, pre-tokenizer names and SentencePiece variants
    /// (Gemma, Phi-3) are refused with [`TokenizerError::Unsupported`].
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, TokenizerError> {
        let model = meta_string(ct, "tokenizer.ggml.model")?
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".to_string()))?;
        let tokens = meta_strings(ct, "tokenizer.ggml.tokens")?;
        let token_types = match meta(ct, "tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => meta_array(ct, "tokenizer.ggml.token_type")?
                .iter()
                .map(|v| {
                    v.to_i32().map(|t| t as u32).or_else(|_| v.to_u32()).map_err(|_| TokenizerError::BadMetadata {
                        key: "tokenizer.ggml.token_type".to_string(),
                        expected: "an array of integers".to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if token_types.len() != tokens.len() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.token_type".to_string(),
                expected: format!("{} entries (one per token), found {}", tokens.len(), token_types.len()),
            });
        }

        let (mut inner, byte_level, add_bos_default) = match model.as_str() {
            "gpt2" => (byte_level_tokenizer(ct, &tokens)?, true, false),
            "llama" => {
                let arch = meta_string(ct, "general.architecture")?.unwrap_or_default();
                if matches!(arch.as_str(), "gemma" | "gemma2" | "gemma3" | "phi3") {
                    return Err(TokenizerError::Unsupported(format!(
                        "the SentencePiece vocabulary of a `{arch}` GGUF (it needs its own \
                         normaliser); pass a Hugging Face folder with tokenizer.json"
                    )));
                }
                (sentencepiece_tokenizer(ct, &tokens)?, false, true)
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer.ggml.model `{other}`: supported from GGUF are byte-level BPE (`gpt2`) \
                     and SentencePiece BPE (`llama`); for other models pass a Hugging Face folder \
                     with tokenizer.json"
                )))
            }
        };

        let bos = special(&tokens, meta_u32(ct, "tokenizer.ggml.bos_token_id")?);
        let eos = special(&tokens, meta_u32(ct, "tokenizer.ggml.eos_token_id")?);
        // llama.cpp writes `unknown_token_id` / `padding_token_id`; accept the short forms too.
        let unk_id = match meta_u32(ct, "tokenizer.ggml.unknown_token_id")? {
            Some(id) => Some(id),
            None => meta_u32(ct, "tokenizer.ggml.unk_token_id")?,
        };
        let pad_id = match meta_u32(ct, "tokenizer.ggml.padding_token_id")? {
            Some(id) => Some(id),
            None => meta_u32(ct, "tokenizer.ggml.pad_token_id")?,
        };
        let unk = special(&tokens, unk_id);
        let pad = special(&tokens, pad_id);

        // In a byte-level vocabulary a control token spelt outside the byte alphabet is a
        // converter's mislabel that the model never sees whole; transformers skips those too.
        let alphabet = ByteLevel::alphabet();
        let in_alphabet = |t: &str| !byte_level || t.chars().all(|c| alphabet.contains(&c));
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(t, ty)| **ty == TOKEN_TYPE_CONTROL && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(control).map_err(backend)?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, ty)| **ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(user).map_err(backend)?;
        // The named special tokens must stay whole even where the file does not mark them control.
        let mut named: Vec<&str> = [&bos, &eos, &pad, &unk]
            .into_iter()
            .flatten()
            .map(|s| s.text.as_str())
            .filter(|t| !inner.get_added_vocabulary().is_special_token(t))
            .collect();
        named.sort_unstable();
        named.dedup();
        let named: Vec<AddedToken> =
            named.into_iter().map(|t| AddedToken::from(t.to_string(), true).normalized(false)).collect();
        inner.add_special_tokens(named).map_err(backend)?;

        let add_bos = meta_bool(ct, "tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
        let add_eos = meta_bool(ct, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.add_bos_token".to_string(),
                expected: "a bos_token_id when BOS is to be added".to_string(),
            });
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.add_eos_token".to_string(),
                expected: "an eos_token_id when EOS is to be added".to_string(),
            });
        }
        if add_bos || add_eos {
            inner.with_post_processor(Some(template_processor(
                add_bos.then_some(bos.as_ref()).flatten(),
                add_eos.then_some(eos.as_ref()).flatten(),
            )?));
        }
        let chat_template = meta_string(ct, "tokenizer.chat_template")?;
        Ok(Tokenizer { inner, bos, eos, pad, unk, add_bos, chat_template })
    }

    /// Loads a Hugging Face `tokenizer.json`. The special tokens, `add_bos_token` and the chat
    /// template come from `tokenizer_config.json` (and `chat_template.jinja`) in the same folder
    /// when present; whether encoding adds BOS is whatever the file's post-processor does.
    pub fn from_file(tokenizer_json: &Path) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| TokenizerError::File { path: tokenizer_json.to_path_buf(), message: e.to_string() })?;
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| TokenizerError::File { path: config_path.clone(), message: e.to_string() })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::File {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?
        } else {
            serde_json::Value::Null
        };
        let named = |key: &str| -> Option<SpecialToken> {
            // A token is written either as a string or as an AddedToken object with `content`.
            let text = match config.get(key)? {
                serde_json::Value::String(s) => s.clone(),
                obj => obj.get("content")?.as_str()?.to_string(),
            };
            let id = inner.token_to_id(&text)?;
            Some(SpecialToken { id, text })
        };
        let (bos, eos, pad, unk) = (named("bos_token"), named("eos_token"), named("pad_token"), named("unk_token"));
        let template_file = dir.join("chat_template.jinja");
        // Either one template, or a list of named ones of which `default` is the chat template.
        let configured = match config.get("chat_template") {
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let chat_template = match configured {
            Some(t) => Some(t),
            None if template_file.is_file() => Some(
                std::fs::read_to_string(&template_file)
                    .map_err(|e| TokenizerError::File { path: template_file.clone(), message: e.to_string() })?,
            ),
            None => None,
        };
        // What the post-processor really does decides; an empty text shows it.
        let empty = inner.encode("", true).map_err(backend)?;
        let add_bos = match (&bos, empty.get_ids().first()) {
            (Some(b), Some(first)) => b.id == *first,
            _ => false,
        };
        Ok(Tokenizer { inner, bos, eos, pad, unk, add_bos, chat_template })
    }

    /// Token ids of `text` as the model expects them: special tokens written in the text (such as
    /// `<|im_start|>`) are recognised, and BOS/EOS are added only if the model's metadata says so.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true)
    }

    /// Like [`Tokenizer::encode`], with `add_special_tokens = false` never adding BOS/EOS (for a
    /// continuation appended to an already encoded prefix).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(backend)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included (`<|im_end|>` is written out).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(backend)
    }

    /// The text of `ids` with special tokens left out.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(backend)
    }

    /// Number of ids, added tokens included (the embedding rows the model needs at least).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of one token spelt exactly as in the vocabulary (byte-level spelling, e.g. `Ġthe`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary spelling of one id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special token (control token), which generation output usually hides.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_vocabulary().get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }

    /// End-of-sequence id; generation stops on it.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|t| t.id)
    }

    /// End-of-sequence token text (for chat templates).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.text.as_str())
    }

    /// Beginning-of-sequence id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }

    /// Beginning-of-sequence token text (for chat templates).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.text.as_str())
    }

    /// Padding id, if the model names one (batched generation may pad with any id it masks).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|t| t.id)
    }

    /// Unknown-token id, if any.
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk.as_ref().map(|t| t.id)
    }

    /// Whether [`Tokenizer::encode`] prepends the BOS token (from the model's metadata).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The Jinja chat template from the model file (`tokenizer.chat_template`), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers` tokenizer, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn template_processor(
    bos: Option<&SpecialToken>,
    eos: Option<&SpecialToken>,
) -> Result<TemplateProcessing, TokenizerError> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some(b) = bos {
        single.push(b.text.clone());
        pair.push(b.text.clone());
        specials.push((b.text.clone(), b.id));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let Some(e) = eos {
        single.push(e.text.clone());
        pair.push(e.text.clone());
        if bos.map(|b| b.id) != Some(e.id) {
            specials.push((e.text.clone(), e.id));
        }
    }
    if let Some(b) = bos {
        pair.push(format!("{}:1", b.text));
    }
    pair.push("$B:1".to_string());
    if let Some(e) = eos {
        pair.push(format!("{}:1", e.text));
    }
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(backend)?
        .try_pair(pair)
        .map_err(backend)?
        .special_tokens(specials)
        .build()
        .map_err(backend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn splits(pre: BytePre, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenizer().unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(p, _, _)| p.to_string()).collect()
    }

    #[test]
    fn smollm_splits_digits_one_by_one_without_prefix_space() {
        // "Ġ" is the byte-level spelling of a space, "Ċ" of a newline, "ĉ" of a tab. GPT-2's
        // pattern attaches only a literal space to a word, so the tab stands alone.
        assert_eq!(splits(BytePre::DigitsThenGpt2, "x = 123\n\tif"), ["x", "Ġ=", "Ġ", "1", "2", "3", "Ċ", "ĉ", "if"]);
        assert_eq!(splits(BytePre::DigitsThenGpt2, "def f"), ["def", "Ġf"]);
    }

    #[test]
    fn gpt2_keeps_digit_runs_and_trailing_space_runs() {
        assert_eq!(splits(BytePre::Gpt2, "a 123   b"), ["a", "Ġ123", "ĠĠ", "Ġb"]);
    }

    #[test]
    fn llama3_groups_digits_by_three() {
        assert_eq!(splits(BytePre::Llama3, "12345 x"), ["123", "45", "Ġx"]);
    }

    #[test]
    fn qwen2_single_digits() {
        assert_eq!(splits(BytePre::Qwen2, "123 x"), ["1", "2", "3", "Ġx"]);
    }

    #[test]
    fn unknown_pre_tokenizer_names_are_refused() {
        assert!(BytePre::from_name("smollm").is_some());
        assert!(BytePre::from_name("default").is_none());
        assert!(BytePre::from_name("jais").is_none());
    }

    /// A GGUF metadata map for a tiny byte-level vocabulary: the 256 byte characters, one merge,
    /// two control tokens.
    fn tiny_gguf(pre: &str, add_bos: bool) -> gguf_file::Content {
        use gguf_file::Value;
        let mut tokens = vec!["<s>".to_string(), "</s>".to_string()];
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort();
        tokens.extend(alphabet.iter().map(|c| c.to_string()));
        tokens.push("Ġa".to_string());
        let mut types = vec![3i32, 3];
        types.extend(std::iter::repeat_n(1, tokens.len() - 2));
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("tokenizer.ggml.model".to_string(), Value::String("gpt2".into()));
        metadata.insert("tokenizer.ggml.pre".to_string(), Value::String(pre.into()));
        metadata.insert(
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        );
        metadata
            .insert("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect()));
        metadata.insert("tokenizer.ggml.merges".to_string(), Value::Array(vec![Value::String("Ġ a".into())]));
        metadata.insert("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0));
        metadata.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1));
        metadata.insert("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(add_bos));
        metadata.insert("tokenizer.chat_template".to_string(), Value::String("{{ x }}".into()));
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn tiny_gguf_round_trip_and_special_tokens() {
        let tok = Tokenizer::from_gguf(&tiny_gguf("smollm", false)).unwrap();
        let id = |s: &str| tok.token_to_id(s).unwrap();
        assert_eq!(tok.encode(" a</s>").unwrap(), vec![id("Ġa"), 1]);
        assert_eq!(tok.encode("a1").unwrap(), vec![id("a"), id("1")]);
        assert_eq!(tok.decode(&tok.encode("x\t y</s>").unwrap()).unwrap(), "x\t y</s>");
        assert_eq!(tok.decode_skip_special(&[id("Ġa"), 1]).unwrap(), " a");
        assert_eq!((tok.bos_token(), tok.eos_token_id()), (Some("<s>"), Some(1)));
        assert!(!tok.add_bos());
        assert!(tok.is_special(1) && !tok.is_special(id("a")));
        assert_eq!(tok.chat_template(), Some("{{ x }}"));
    }

    #[test]
    fn sentencepiece_merges_follow_scores_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "▁", "▁a"].map(String::from).to_vec();
        // "abc" (score -1) splits as a+bc and ab+c; "▁a" (-1) as ▁+a; "ab" (-2); "bc" (-3).
        let scores = [0.0, 0.0, 0.0, -2.0, -3.0, -1.0, 0.0, -1.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        // Score -1 first: "ab"+"c" (left 2 chars) before "a"+"bc" and "▁"+"a" (left 1 char; then
        // the right part's length: "bc" before "a"); then -2, then -3.
        assert_eq!(pairs, [("ab", "c"), ("a", "bc"), ("▁", "a"), ("a", "b"), ("b", "c")]);
    }

    #[test]
    fn add_bos_metadata_prepends_bos_only_when_asked() {
        let tok = Tokenizer::from_gguf(&tiny_gguf("gpt2", true)).unwrap();
        let a = tok.token_to_id("a").unwrap();
        assert_eq!(tok.encode("a").unwrap(), vec![0, a]);
        assert_eq!(tok.encode_with("a", false).unwrap(), vec![a]);
    }

    #[test]
    fn unsupported_tokenizers_are_clear_errors() {
        let err = Tokenizer::from_gguf(&tiny_gguf("jais", false)).unwrap_err().to_string();
        assert!(err.contains("pre-tokenizer `jais`"), "{err}");
        let mut ct = tiny_gguf("smollm", false);
        ct.metadata.insert("tokenizer.ggml.model".to_string(), gguf_file::Value::String("bert".into()));
        let err = Tokenizer::from_gguf(&ct).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.model `bert`"), "{err}");
        ct.metadata.insert("tokenizer.ggml.model".to_string(), gguf_file::Value::String("llama".into()));
        ct.metadata.insert("general.architecture".to_string(), gguf_file::Value::String("gemma2".into()));
        let err = Tokenizer::from_gguf(&ct).unwrap_err().to_string();
        assert!(err.contains("`gemma2` GGUF"), "{err}");
    }
}
