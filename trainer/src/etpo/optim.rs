//! AdamW over a fixed list of f32 variables, with its state open for checkpoints.
//!
//! The update is the same as `candle_nn::AdamW` (decoupled weight decay, bias-corrected
//! moments); candle keeps the moments private, and an exact resume needs them saved.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate α.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (multiplies the parameters by `1 − lr·weight_decay` each step).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value before the step (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0) }
    }
}

/// AdamW over named variables. Gradients are given as a slice aligned with the variables.
pub struct AdamW {
    names: Vec<String>,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// One optimiser over `vars` (names are used as checkpoint keys and must be unique).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<AdamW> {
        let mut names = Vec::with_capacity(vars.len());
        let mut vs = Vec::with_capacity(vars.len());
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            m.push(Tensor::zeros(var.shape(), DType::F32, var.device())?);
            v.push(Tensor::zeros(var.shape(), DType::F32, var.device())?);
            names.push(name);
            vs.push(var);
        }
        Ok(AdamW { names, vars: vs, m, v, step: 0, cfg })
    }

    /// The variables, in order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One AdamW step. `grads[i]` is the gradient of `vars()[i]` (`None`: no gradient, the
    /// variable and its moments are left alone, as in candle). Returns the gradient norm
    /// before clipping.
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        let clip = match self.cfg.max_grad_norm {
            Some(max) if norm > max && norm > 0.0 => max / norm,
            _ => 1.0,
        };
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        let scale_m = 1.0 / (1.0 - c.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - c.beta2.powi(t));
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = (g.to_dtype(DType::F32)? * clip)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + c.eps)?)?;
            let theta = self.vars[i].as_tensor();
            let next = ((theta * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
            self.vars[i].set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// The moments as named tensors (`<name>.m`, `<name>.v`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            out.insert(format!("{name}.m"), self.m[i].clone());
            out.insert(format!("{name}.v"), self.v[i].clone());
        }
        out
    }

    /// Restore moments and the step counter saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> std::result::Result<(), String> {
        for (i, name) in self.names.iter().enumerate() {
            for (suffix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{name}.{suffix}");
                let t = tensors.get(&key).ok_or_else(|| format!("optimiser state `{key}` is missing"))?;
                if t.shape() != slot.shape() {
                    return Err(format!(
                        "optimiser state `{key}` has shape {:?}, expected {:?}",
                        t.shape(),
                        slot.shape()
                    ));
                }
                *slot = t.to_dtype(DType::F32).and_then(|t| t.to_device(slot.device())).map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_adamw_without_clipping() {
        use candle_nn::Optimizer;
        let x0 = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let ours = Var::from_tensor(&x0).unwrap();
        let theirs = Var::from_tensor(&x0).unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.01, max_grad_norm: None, ..Default::default() };
        let mut a = AdamW::new(vec![("x".into(), ours.clone())], cfg).unwrap();
        let mut b = candle_nn::AdamW::new(
            vec![theirs.clone()],
            candle_nn::ParamsAdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
        )
        .unwrap();
        for _ in 0..3 {
            let la = ours.as_tensor().sqr().unwrap().sum_all().unwrap();
            let g = la.backward().unwrap();
            a.step(&[g.get(ours.as_tensor()).cloned()]).unwrap();
            let lb = theirs.as_tensor().sqr().unwrap().sum_all().unwrap();
            b.backward_step(&lb).unwrap();
        }
        let d = (ours.as_tensor() - theirs.as_tensor()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn clipping_scales_the_gradient() {
        let var = Var::from_tensor(&Tensor::new(&[0.0f32, 0.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { lr: 1.0, max_grad_norm: Some(1.0), ..Default::default() };
        let mut a = AdamW::new(vec![("x".into(), var.clone())], cfg).unwrap();
        let g = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let norm = a.step(&[Some(g)]).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        // First Adam step moves each coordinate by ≈ lr·sign(g) whatever the scale.
        let x = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((x[0] + 1.0).abs() < 1e-4 && (x[1] + 1.0).abs() < 1e-4, "{x:?}");
        let st = a.state_tensors();
        let m = st["x.m"].to_vec1::<f32>().unwrap();
        assert!((m[0] - 0.1 * 0.6).abs() < 1e-6, "clipped g = (0.6, 0.8): {m:?}");
    }
}
