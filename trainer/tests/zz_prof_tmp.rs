use candle_core::{Device, Tensor};
use trainer::*;
#[test]
fn prof() {
    let m = load_model(&default_model_path(), &Device::Cpu).unwrap();
    let mut model = m.model;
    model.add_adapter("pi", &LoraConfig::default()).unwrap();
    let (b, t) = (2usize, 320usize);
    let ids = Tensor::from_vec((0..b * t).map(|i| (i * 7 % 4000) as u32).collect::<Vec<_>>(), (b, t), &Device::Cpu).unwrap();
    let t0 = std::time::Instant::now();
    let logits = model.forward(&ids, None, Some("pi")).unwrap();
    let t1 = t0.elapsed().as_secs_f64();
    let pred = logits.narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), 49152)).unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let loss = candle_nn::loss::cross_entropy(&pred, &targets).unwrap();
    let t2 = t0.elapsed().as_secs_f64();
    let _g = loss.backward().unwrap();
    eprintln!("fwd {t1:.2} loss {:.2} bwd {:.2}", t2 - t1, t0.elapsed().as_secs_f64() - t2);
}
