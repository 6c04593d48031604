//! Visiting orders for the coordinate sweeps (spec a.6).
//!
//! The greedy order visits, per output row, the inputs by `|W_ij|·‖x_j‖` descending: the weights
//! that contribute most to the output are fixed first and the many small ones absorb their
//! error. It is computed once from the float weights and reused in every sweep. Ties are broken
//! by index (a stable sort) so a run is reproducible — the reference's `torch.argsort` is not.
//!
//! The shared order visits the same column in every row at the same step (by the column's total
//! contribution `‖x_j‖·Σ_i |W_ij|`). It gives up the per-row choice, and in exchange the sweep can
//! be blocked: the steps inside a block of [`SHARED_BLOCK`] columns touch only a small corner of
//! `G`, and the residual update of the whole layer for that block is one matrix product
//! (`R −= D·G[block, :]`), the form GPTQ's lazy batches use. See `ARCHITECTURE.md`.

/// The order in which each row's coordinates are visited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderKind {
    /// Per row, by `|W_ij|·sqrt(G_jj)` descending (spec a.6); what the paper's results use.
    #[default]
    Greedy,
    /// `0, 1, …, n−1` for every row.
    Natural,
    /// One order for all rows, by `sqrt(G_jj)·Σ_i |W_ij|` descending, swept in blocks whose
    /// residual updates are matrix products (much faster; usually a little less accurate).
    Shared,
}

crate::util::value_enum!(OrderKind {
    Greedy = "greedy",
    Natural = "natural",
    Shared = "shared",
});

/// Columns per block of the shared-order sweep, on every device (the GPU keeps the block's
/// `G` corner, `64 × 64` f32 = 16 KiB, in workgroup memory).
pub const SHARED_BLOCK: usize = 64;

/// The per-row permutation of column indices that a sweep walks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Every row visits `0, 1, …, n−1`.
    Natural {
        /// Columns.
        cols: usize,
    },
    /// Every row visits `perm` (one permutation for the whole layer); swept in blocks.
    Shared {
        /// Columns.
        cols: usize,
        /// The permutation.
        perm: Vec<u32>,
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
                use rayon::prelude::*;
                let norms: Vec<f64> = diag.iter().map(|&g| g.max(0.0).sqrt()).collect();
                let mut perm = vec![0u32; rows * cols];
                // Rows are independent sorts: in parallel, each writing its own slice.
                perm.par_chunks_mut(cols.max(1))
                    .zip(w.par_chunks(cols.max(1)))
                    .for_each_init(
                        || vec![0.0f64; cols],
                        |score, (idx, row)| {
                            for (s, (&v, &g)) in score.iter_mut().zip(row.iter().zip(&norms)) {
                                *s = (v as f64).abs() * g;
                            }
                            for (j, x) in idx.iter_mut().enumerate() {
                                *x = j as u32;
                            }
                            // Stable: equal scores keep ascending index order.
                            idx.sort_by(|&a, &b| score[b as usize].total_cmp(&score[a as usize]));
                        },
                    );
                Order::PerRow { cols, perm }
            }
            OrderKind::Shared => {
                let mut score = vec![0.0f64; cols];
                for row in w.chunks(cols.max(1)).take(rows) {
                    for (s, &v) in score.iter_mut().zip(row) {
                        *s += (v as f64).abs();
                    }
                }
                for (s, &g) in score.iter_mut().zip(diag) {
                    *s *= g.max(0.0).sqrt();
                }
                let mut perm: Vec<u32> = (0..cols as u32).collect();
                perm.sort_by(|&a, &b| score[b as usize].total_cmp(&score[a as usize]));
                Order::Shared { cols, perm }
            }
        }
    }

    /// The column visited at step `t` of row `row`.
    #[inline]
    pub fn at(&self, row: usize, t: usize) -> usize {
        match self {
            Order::Natural { .. } => t,
            Order::Shared { perm, .. } => perm[t] as usize,
            Order::PerRow { cols, perm } => perm[row * cols + t] as usize,
        }
    }

    /// The full `rows × cols` permutation table, materialised (what GPU devices upload).
    pub fn table(&self, rows: usize) -> Vec<u32> {
        match self {
            Order::Natural { cols } => (0..rows).flat_map(|_| 0..*cols as u32).collect(),
            Order::Shared { perm, .. } => (0..rows).flat_map(|_| perm.iter().copied()).collect(),
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

    #[test]
    fn shared_order_ranks_columns_by_total_contribution() {
        // rows [1, -3, 2] and [1, 1, -2]; column sums 2, 4, 4; norms 1, 1, 2 -> 2, 4, 8
        let w = [1.0f32, -3.0, 2.0, 1.0, 1.0, -2.0];
        let diag = [1.0, 1.0, 4.0];
        let o = Order::build(OrderKind::Shared, &w, 2, 3, &diag);
        assert_eq!(
            o,
            Order::Shared {
                cols: 3,
                perm: vec![2, 1, 0]
            }
        );
        assert_eq!(o.at(1, 0), 2);
        assert_eq!(o.table(2), vec![2, 1, 0, 2, 1, 0]);
    }
}
