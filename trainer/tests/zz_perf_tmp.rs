use candle_core::{Device, Tensor};
use trainer::*;
#[test]
fn perf() {
    let m = load_model(&default_model_path(), &Device::Cpu).unwrap();
    let mut model = m.model;
    model.add_adapter("pi", &LoraConfig::default()).unwrap();
    let ids = Tensor::from_vec((0..4 * 320).map(|i| (i * 7 % 4000) as u32).collect::<Vec<_>>(), (4, 320), &Device::Cpu).unwrap();
    for round in 0..2 {
        let t0 = std::time::Instant::now();
        let opts = ForwardOptions { adapter: Some("pi"), track_grad: false, dropout_seed: None };
        let h = model.forward_hidden(&ids, None, &opts).unwrap();
        let nograd = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let opts = ForwardOptions { adapter: Some("pi"), track_grad: true, dropout_seed: None };
        let h = model.forward_hidden(&ids, None, &opts).unwrap();
        let fwd = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let logits = model.logits(&h).unwrap();
        let loss = candle_nn::ops::log_softmax(&logits, 2).unwrap().mean_all().unwrap();
        let head = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let _g = loss.backward().unwrap();
        let bwd = t0.elapsed().as_secs_f64();
        eprintln!("round {round}: hidden no-grad {nograd:.2}s, hidden tracked {fwd:.2}s, head+logsoftmax {head:.2}s, backward {bwd:.2}s");
    }
}
