use candle_core::{Device, Tensor};
use trainer::*;
#[test]
fn perf() {
    let m = load_model(&default_model_path(), &Device::Cpu).unwrap();
    let mut model = m.model;
    model.add_adapter("pi", &LoraConfig::default()).unwrap();
    let t0 = std::time::Instant::now();
    let merged = model.merge_adapter("pi").unwrap();
    eprintln!("merge {:.2}s", t0.elapsed().as_secs_f64());
    let b = 8;
    let ids = Tensor::from_vec((0..b * 100).map(|i| (i * 7 % 4000) as u32).collect::<Vec<_>>(), (b, 100), &Device::Cpu).unwrap();
    let mut t = [0.0f64; 3];
    for round in 0..6 {
        for mode in 0..3 {
            let adapter = if mode == 1 { Some("pi") } else { None };
            let opts = ForwardOptions { adapter, track_grad: false, dropout_seed: None };
            let mut cache = KvCache::with_capacity(&model, b, 200);
            model.forward_step(&ids, None, &mut cache, &opts).unwrap();
            let t0 = std::time::Instant::now();
            for i in 0..8u32 {
                let x = Tensor::from_vec(vec![i + 5; b], (b, 1), &Device::Cpu).unwrap();
                let h = if mode == 2 { model.forward_step_merged(&x, None, &mut cache, &merged).unwrap() } else { model.forward_step(&x, None, &mut cache, &opts).unwrap() };
                let _l = model.logits(&h).unwrap().to_vec3::<f32>().unwrap();
            }
            if round > 0 { t[mode] += t0.elapsed().as_secs_f64() / 8.0 / 5.0; }
        }
    }
    eprintln!("decode step b=8: base {:.1} ms, adapter {:.1} ms, merged {:.1} ms", t[0]*1e3, t[1]*1e3, t[2]*1e3);
}
