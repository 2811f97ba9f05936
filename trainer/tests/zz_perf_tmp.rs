use candle_core::{Device, Tensor, DType};
#[test]
fn perf() {
    let dev = Device::Cpu;
    let ws: Vec<Tensor> = (0..30*4).map(|_| Tensor::randn(0f32, 0.02, (1536, 576), &dev).unwrap()).collect();
    let wts: Vec<Tensor> = ws.iter().map(|w| w.t().unwrap().contiguous().unwrap()).collect();
    for b in [1usize, 8] {
    let x = Tensor::randn(0f32, 1.0, (b, 576), &dev).unwrap();
    for round in 0..3 {
        let t0 = std::time::Instant::now();
        for w in &ws { let _ = x.matmul(&w.t().unwrap()).unwrap(); }
        let a = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        for w in &wts { let _ = x.matmul(w).unwrap(); }
        let bb = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        for w in &ws { let _ = w.matmul(&x.t().unwrap()).unwrap(); }
        let c = t0.elapsed().as_secs_f64();
        eprintln!("b={b} round {round}: x@W.t {:.1} ms, x@Wt(contig) {:.1} ms, W@x.t {:.1} ms", a*1e3, bb*1e3, c*1e3);
    }}
}
