//! A scalar value head on a language model's final hidden states: `V(c) = w·h(c) + b`.
//!
//! ETPO's Q-network reads its per-context soft value from one (see
//! [`crate::etpo::QReadout::Dueling`]), and PPO-KL's critic is one on the frozen base. It starts
//! at zero (`w = 0`, `b = 0`), so a network that adds it starts exactly where it was without it.

use candle_core::{DType, Device, Result, Tensor, Var, D};

/// `V(c) = w·h(c) + b` with `w: [H]`, `b: [1]` in f32.
#[derive(Debug, Clone)]
pub struct ValueHead {
    w: Var,
    b: Var,
}

impl ValueHead {
    /// A head at zero for hidden size `hidden`.
    pub fn zeros(hidden: usize, device: &Device) -> Result<ValueHead> {
        Ok(ValueHead { w: Var::zeros(hidden, DType::F32, device)?, b: Var::zeros(1, DType::F32, device)? })
    }

    /// `[N]` values of `[N, H]` hidden states (any float dtype). Gradients reach the head, and
    /// the hidden states if they track them.
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = hidden.to_dtype(DType::F32)?;
        h.broadcast_mul(&self.w.as_tensor().unsqueeze(0)?)?.sum(D::Minus1)?.broadcast_add(self.b.as_tensor())
    }

    /// The head's variables, `[w, b]` (for optimisers and checkpoints).
    pub fn vars(&self) -> Vec<Var> {
        vec![self.w.clone(), self.b.clone()]
    }

    /// Makes this head equal to `src` (values copied, variables stay distinct).
    pub fn assign_from(&self, src: &ValueHead) -> Result<()> {
        self.w.set(&src.w.as_detached_tensor().copy()?)?;
        self.b.set(&src.b.as_detached_tensor().copy()?)
    }

    /// Polyak averaging `self ← λ·self + (1−λ)·src` (the target network's rule).
    pub fn polyak_from(&self, src: &ValueHead, lambda: f64) -> Result<()> {
        for (d, s) in [(&self.w, &src.w), (&self.b, &src.b)] {
            let new =
                (d.as_detached_tensor().affine(lambda, 0.0)? + s.as_detached_tensor().affine(1.0 - lambda, 0.0)?)?;
            d.set(&new)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_by_hand_and_polyak() {
        let dev = Device::Cpu;
        let head = ValueHead::zeros(2, &dev).unwrap();
        let h = Tensor::new(&[[1.0f32, 2.0], [-1.0, 0.5]], &dev).unwrap();
        assert_eq!(head.values(&h).unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
        let src = ValueHead::zeros(2, &dev).unwrap();
        src.w.set(&Tensor::new(&[0.5f32, -1.0], &dev).unwrap()).unwrap();
        src.b.set(&Tensor::new(&[2.0f32], &dev).unwrap()).unwrap();
        // 0.5·1 − 1·2 + 2 = 0.5; 0.5·(−1) − 0.5 + 2 = 1.
        assert_eq!(src.values(&h).unwrap().to_vec1::<f32>().unwrap(), vec![0.5, 1.0]);
        head.polyak_from(&src, 0.75).unwrap();
        assert_eq!(head.values(&h).unwrap().to_vec1::<f32>().unwrap(), vec![0.125, 0.25]);
        head.assign_from(&src).unwrap();
        assert_eq!(head.values(&h).unwrap().to_vec1::<f32>().unwrap(), vec![0.5, 1.0]);
        // Distinct variables: changing the source later leaves the copy alone.
        src.b.set(&Tensor::new(&[0.0f32], &dev).unwrap()).unwrap();
        assert_eq!(head.values(&h).unwrap().to_vec1::<f32>().unwrap(), vec![0.5, 1.0]);
    }
}
