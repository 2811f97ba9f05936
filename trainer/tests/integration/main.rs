//! The trainer crate's integration tests, in one binary: parity with transformers / PEFT on the
//! default model and its fixtures (`../fixtures`), ETPO and PPO-KL on a tiny random model, and
//! (with `--features cuda`) the same on a GPU.

mod etpo_common;

mod chat_template_parity;
mod cuda;
mod default_model;
mod etpo_credit;
mod etpo_ppo;
mod etpo_trainer;
mod grpo;
mod logits_parity;
mod peft_parity;
mod tokenizer_parity;
