//! Visiting orders for the coordinate sweeps (spec a.6).
//!
//! The greedy order visits, per output row, the inputs by `|W_ij|·‖x_j‖` descending: the weights
//! that contribute most to the output are fixed first and the many small ones absorb their
//! error. It is computed once from the float weights and reused in every sweep. Ties are broken
//! by index (a stable sort) so a run is reproducible — the reference's `torch.argsort` is not.

use super::OrderKind;

/// The per-row permutation of column indices that a sweep walks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Every row visits `0, 1, …, n−1`.
    Natural {
        /// Columns.
        cols: usize,
    },
    /// Row `i` visits `perm[i*cols .. (i+1)*cols]`.
    PerRow {
        /// Columns.
        cols: usize,
        /// Row-major permutations.
        perm: Vec<u32>,
    },
}

impl Order {
    /// Builds the order of `kind` for a row-major `rows × cols` weight and the Gram diagonal.
    pub fn build(kind: OrderKind, w: &[f32], rows: usize, cols: usize, diag: &[f64]) -> Order {
        match kind {
            OrderKind::Natural => Order::Natural { cols },
            OrderKind::Greedy => {
                let norms: Vec<f64> = diag.iter().map(|&g| g.max(0.0).sqrt()).collect();
                let mut perm = Vec::with_capacity(rows * cols);
                let mut idx: Vec<u32> = Vec::with_capacity(cols);
                let mut score = vec![0.0f64; cols];
                for r in 0..rows {
                    let row = &w[r * cols..(r + 1) * cols];
                    for j in 0..cols {
                        score[j] = (row[j] as f64).abs() * norms[j];
                    }
                    idx.clear();
                    idx.extend(0..cols as u32);
                    // Stable: equal scores keep ascending index order.
                    idx.sort_by(|&a, &b| score[b as usize].total_cmp(&score[a as usize]));
                    perm.extend_from_slice(&idx);
                }
                Order::PerRow { cols, perm }
            }
        }
    }

    /// The column visited at step `t` of row `row`.
    #[inline]
    pub fn at(&self, row: usize, t: usize) -> usize {
        match self {
            Order::Natural { .. } => t,
            Order::PerRow { cols, perm } => perm[row * cols + t] as usize,
        }
    }

    /// The full `rows × cols` permutation table, materialised (what GPU devices upload).
    pub fn table(&self, rows: usize) -> Vec<u32> {
        match self {
            Order::Natural { cols } => (0..rows).flat_map(|_| 0..*cols as u32).collect(),
            Order::PerRow { perm, .. } => perm.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_order_is_descending_and_stable() {
        let w = [0.5f32, -2.0, 0.5, 1.0];
        let diag = [1.0, 1.0, 1.0, 4.0];
        let o = Order::build(OrderKind::Greedy, &w, 1, 4, &diag);
        // scores: 0.5, 2.0, 0.5, 2.0 -> 1, 3 (tie, by index), then 0, 2 (tie, by index)
        assert_eq!(
            o,
            Order::PerRow {
                cols: 4,
                perm: vec![1, 3, 0, 2]
            }
        );
    }
}
