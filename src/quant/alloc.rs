//! Mixed precision under a size budget (`--target-bits`): bits per layer that minimise the summed
//! per-layer error at a given average.
//!
//! Every layer has a measured error at each width it may take (its held-out relative output
//! error after quantization). The allocation is a multiple-choice knapsack: minimise
//! `Σ_l err_l(b_l)` subject to `Σ_l n_l·b_l ≤ B·Σ_l n_l` (`n_l` the layer's weights). It is
//! solved greedily by marginal value: all layers start at their narrowest width, and the upgrade
//! (to any wider width, so a non-convex error curve cannot trap a layer) with the largest error
//! saved per bit added is taken while it fits. Layers whose width the recipe fixes count against
//! the budget at that width and are never changed.

use crate::error::{Error, Result};

/// One layer's side of the allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCost {
    /// Weights in the layer.
    pub weights: usize,
    /// `(bits, error)` for every width the layer may take, ascending bits.
    pub errors: Vec<(u32, f64)>,
    /// A width fixed by the user (`None`: free).
    pub fixed: Option<u32>,
}

/// Bits per layer with an average of at most `target` bits per weight over all layers.
pub fn allocate(layers: &[LayerCost], target: f64) -> Result<Vec<u32>> {
    let total: f64 = layers.iter().map(|l| l.weights as f64).sum();
    let mut budget = target * total;
    let mut choice: Vec<usize> = vec![0; layers.len()];
    let mut bits = vec![0u32; layers.len()];
    for (i, l) in layers.iter().enumerate() {
        let b = match l.fixed {
            Some(b) => b,
            None => {
                let Some(&(b, _)) = l.errors.first() else {
                    return Err(Error::InvalidOption(
                        "--target-bits: a layer has no measured width".into(),
                    ));
                };
                b
            }
        };
        bits[i] = b;
        budget -= l.weights as f64 * b as f64;
    }
    if budget < -1e-9 * total {
        let min = (target * total - budget) / total;
        return Err(Error::InvalidOption(format!(
            "--target-bits {target} is below the smallest average these layers can take \
             ({min:.3} bits per weight)"
        )));
    }
    loop {
        // The best upgrade that fits: error saved per bit of budget.
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, l) in layers.iter().enumerate() {
            if l.fixed.is_some() {
                continue;
            }
            let (b0, e0) = l.errors[choice[i]];
            for (k, &(b1, e1)) in l.errors.iter().enumerate().skip(choice[i] + 1) {
                let cost = l.weights as f64 * (b1 - b0) as f64;
                if cost > budget + 1e-9 * total || e1 >= e0 {
                    continue;
                }
                let gain = (e0 - e1) / cost;
                if best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, i, k));
                }
            }
        }
        let Some((_, i, k)) = best else { break };
        let l = &layers[i];
        budget -= l.weights as f64 * (l.errors[k].0 - l.errors[choice[i]].0) as f64;
        choice[i] = k;
        bits[i] = l.errors[k].0;
    }
    Ok(bits)
}

/// Average bits per weight of an allocation.
pub fn average(layers: &[LayerCost], bits: &[u32]) -> f64 {
    let total: f64 = layers.iter().map(|l| l.weights as f64).sum();
    layers
        .iter()
        .zip(bits)
        .map(|(l, &b)| l.weights as f64 * b as f64)
        .sum::<f64>()
        / total.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: usize, scale: f64) -> LayerCost {
        LayerCost {
            weights: n,
            errors: (2..=8)
                .map(|b| (b, scale * 4f64.powi(-(b as i32))))
                .collect(),
            fixed: None,
        }
    }

    #[test]
    fn the_budget_is_met_and_sensitive_layers_get_more_bits() {
        let layers = vec![layer(100, 1.0), layer(100, 64.0)];
        let bits = allocate(&layers, 4.0).unwrap();
        assert!(average(&layers, &bits) <= 4.0 + 1e-12);
        assert!(bits[1] > bits[0], "{bits:?}");
    }

    #[test]
    fn the_allocation_is_within_a_quarter_of_the_optimum_on_a_small_case() {
        let layers = vec![layer(10, 1.0), layer(30, 5.0), layer(20, 0.2)];
        let target = 3.5;
        let bits = allocate(&layers, target).unwrap();
        let cost = |b: &[u32]| -> f64 {
            layers
                .iter()
                .zip(b)
                .map(|(l, &x)| l.errors[(x - 2) as usize].1)
                .sum()
        };
        // Brute force over every width assignment within the budget.
        let mut best = f64::INFINITY;
        for a in 2..=8u32 {
            for b in 2..=8u32 {
                for c in 2..=8u32 {
                    if average(&layers, &[a, b, c]) <= target + 1e-12 {
                        best = best.min(cost(&[a, b, c]));
                    }
                }
            }
        }
        assert!(
            cost(&bits) <= best * 1.25,
            "{bits:?}: {} vs {best}",
            cost(&bits)
        );
    }

    #[test]
    fn fixed_layers_count_and_an_impossible_target_is_an_error() {
        let mut l = vec![layer(100, 1.0), layer(100, 1.0)];
        l[0].fixed = Some(8);
        let bits = allocate(&l, 5.0).unwrap();
        assert_eq!(bits, vec![8, 2]);
        assert!(allocate(&l, 4.0).is_err());
    }
}
