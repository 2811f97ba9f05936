//! The CUDA path against the CPU path (needs `--features cuda` and a GPU; empty otherwise):
//! batched generation with padding, LoRA gradients, and whole ETPO updates give on the GPU what
//! they give on the CPU. The CPU side uses the fused kernels and BLAS, the GPU side candle's
//! compositions and cuBLAS, so these tests also check the two implementations of each op
//! against each other. Logits against transformers on the GPU: logits_parity.rs.
//!
//! Build on a machine without a GPU with `scripts/cuda.sh test-build`; run on one as
//! `ETPO_CACHE=... target/cuda/tests/cuda`.
#![cfg(feature = "cuda")]

use crate::etpo_common::*;
use candle_core::{DType, Device, Tensor};
use trainer::etpo::{AdamWConfig, EtpoConfig, EtpoTrainer, POLICY};
use trainer::model::{BlockWeights, Llama, LlamaWeights};
use trainer::{GenerateConfig, LoraConfig};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test needs a GPU)")
}

/// The same model, its frozen weights copied to `device`.
fn to_device(model: &Llama, device: &Device) -> Llama {
    let w = model.weights();
    let mv = |t: &Tensor| t.to_device(device).expect("copy a weight");
    let weights = LlamaWeights {
        embed: mv(&w.embed),
        blocks: w
            .blocks
            .iter()
            .map(|b| BlockWeights {
                attn_norm: mv(&b.attn_norm),
                proj: b.proj.clone().map(|p| mv(&p)),
                mlp_norm: mv(&b.mlp_norm),
            })
            .collect(),
        norm: mv(&w.norm),
        lm_head: w.lm_head.as_ref().map(mv),
    };
    Llama::new(model.config().clone(), weights).expect("the model on the new device")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn greedy_generation_on_cuda_matches_the_cpu_and_ignores_padding() {
    let path = trainer::default_model_path();
    assert!(path.is_file(), "the default model {} is needed: run scripts/setup.sh model", path.display());
    let cpu = trainer::load::load_model_as(&path, &Device::Cpu, DType::F32).expect("load on the CPU");
    let cuda = trainer::load::load_model_as(&path, &gpu(), DType::F32).expect("load on the GPU");
    let prompts: Vec<String> = ["def build_model(x_train, y_train):\n", "The capital of France is", "1, 2, 3, 5, 8,"]
        .map(String::from)
        .to_vec();
    let cfg = GenerateConfig { max_new_tokens: 24, temperature: 0.0, ..Default::default() };
    let batched = trainer::generate(&cuda.model, &cuda.tokenizer, &prompts, &cfg, None).expect("batched on the GPU");
    for (i, prompt) in prompts.iter().enumerate() {
        let alone =
            trainer::generate(&cuda.model, &cuda.tokenizer, std::slice::from_ref(prompt), &cfg, None).expect("alone");
        assert_eq!(batched[i].tokens, alone[0].tokens, "{prompt:?}: batched with padding vs alone on the GPU");
        let on_cpu = trainer::generate(&cpu.model, &cpu.tokenizer, std::slice::from_ref(prompt), &cfg, None)
            .expect("on the CPU");
        assert_eq!(alone[0].tokens, on_cpu[0].tokens, "{prompt:?}: GPU vs CPU");
        for (g, c) in alone[0].logprobs.iter().zip(&on_cpu[0].logprobs) {
            assert!((g - c).abs() < 1e-3, "{prompt:?}: log-probabilities {g} (GPU) vs {c} (CPU)");
        }
    }
    // The production dtype: bf16 weights still generate, batched, to the full length or EOS.
    let bf16 = trainer::load_model(&path, &gpu()).expect("load in the GPU's default dtype");
    assert_eq!(bf16.model.dtype(), DType::BF16);
    let out =
        trainer::generate(&bf16.model, &bf16.tokenizer, &prompts, &GenerateConfig::default(), None).expect("bf16");
    assert!(out.iter().all(|c| !c.tokens.is_empty() && c.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0)));
}

#[test]
fn lora_forward_and_gradients_on_cuda_match_the_cpu() {
    let mut on_cpu = tiny_model(3);
    let mut on_gpu = to_device(&on_cpu, &gpu());
    let lora = LoraConfig { rank: 4, alpha: 8.0, ..Default::default() };
    for m in [&mut on_cpu, &mut on_gpu] {
        m.add_adapter_seeded("pi", &lora, 9).unwrap();
        // B starts at zero; give it values so that gradients reach A too.
        for v in m.adapter_vars("pi") {
            let n = v.as_tensor().elem_count();
            let vals: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.2).collect();
            let t = Tensor::from_vec(vals, v.as_tensor().shape(), v.as_tensor().device()).unwrap();
            v.set(&t).unwrap();
        }
    }
    // The second row is left-padded by two tokens; only real positions enter the loss, since
    // what a padded position computes is unspecified.
    let ids = [[1u32, 9, 3, 12, 5, 7], [0, 0, 4, 2, 11, 6]];
    let mask = [[1f32; 6], [0., 0., 1., 1., 1., 1.]];
    let run = |m: &Llama| {
        let dev = m.device();
        let ids = Tensor::new(&ids, dev).unwrap();
        let mask = Tensor::new(&mask, dev).unwrap();
        let logits = m.forward(&ids, Some(&mask), Some("pi")).unwrap().narrow(1, 2, 4).unwrap();
        let loss = candle_nn::ops::log_softmax(&logits, 2).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        // Frozen weights get no gradient: on a 7B model those would be a second copy of it.
        let w = m.weights();
        for frozen in w.blocks.iter().flat_map(|b| b.proj.iter()).chain(w.lm_head.iter()) {
            assert!(grads.get(frozen).is_none(), "a frozen weight got a gradient on {:?}", m.device());
        }
        let g: Vec<Tensor> =
            m.adapter_vars("pi").iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect();
        (logits, g)
    };
    let (l_cpu, g_cpu) = run(&on_cpu);
    let (l_gpu, g_gpu) = run(&on_gpu);
    assert!(max_abs_diff(&l_cpu, &l_gpu) < 1e-4, "logits differ by {}", max_abs_diff(&l_cpu, &l_gpu));
    for (i, (c, g)) in g_cpu.iter().zip(&g_gpu).enumerate() {
        let scale = max_abs_diff(c, &c.zeros_like().unwrap()).max(1e-6);
        let d = max_abs_diff(c, g);
        assert!(d <= 1e-3 * scale + 1e-7, "gradient {i}: differs by {d} (largest entry {scale})");
    }
}

#[test]
fn etpo_updates_on_cuda_match_the_cpu() {
    let optim = AdamWConfig { lr: 3e-2, ..Default::default() };
    let cfg = EtpoConfig {
        beta: 0.01,
        q_optim: optim,
        policy_optim: optim,
        lora_rank: 4,
        lora_alpha: 8.0,
        polyak: 0.8,
        ..Default::default()
    };
    let mut on_cpu = tiny_model(7);
    let mut on_gpu = to_device(&on_cpu, &gpu());
    let mut t_cpu = EtpoTrainer::new(&mut on_cpu, cfg.clone()).unwrap();
    let mut t_gpu = EtpoTrainer::new(&mut on_gpu, cfg).unwrap();
    let mut rng = Rng(11);
    for i in 0..4 {
        // Both sides learn from the same transitions, sampled by the CPU model.
        let b = batch(&on_cpu, Some(POLICY), 8, 1.0, &mut rng);
        let m_cpu = t_cpu.update(&on_cpu, &b).unwrap();
        let m_gpu = t_gpu.update(&on_gpu, &b).unwrap();
        for (what, c, g) in [
            ("q_loss", m_cpu.q_loss, m_gpu.q_loss),
            ("policy_loss", m_cpu.policy_loss, m_gpu.policy_loss),
            ("kl", m_cpu.kl, m_gpu.kl),
            ("q_target_mean", m_cpu.q_target_mean, m_gpu.q_target_mean),
        ] {
            assert!((c - g).abs() <= 1e-3 * c.abs().max(1.0), "update {i}: {what} {c} (CPU) vs {g} (GPU)");
        }
    }
    let d = max_diff(&adapter_values(&on_cpu, POLICY), &adapter_values(&on_gpu, POLICY));
    assert!(d < 1e-3, "policy adapters after 4 updates differ by {d}");
}
