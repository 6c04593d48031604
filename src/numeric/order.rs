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

/// How a device holds an order ([`Order::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderLayout {
    /// No indices: every row visits `0..n`.
    Natural,
    /// One permutation of the columns for every row.
    Shared,
    /// One permutation per row.
    PerRow,
}

/// The per-row permutation of column indices that a sweep walks.
#[derive(Debug, Clone, PartialEq)]
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
    /// The greedy order not built yet: each row of the weights it goes with visits its inputs
    /// by `|W_ij|·norms[j]` descending, ties by index. It is built where the weights are (see
    /// [`Order::resolve`]), so a device that holds `W` can rank it itself instead of receiving
    /// `rows × cols` indices: the same permutation as [`Order::build`] gives, bit for bit.
    Ranked {
        /// Columns.
        cols: usize,
        /// `sqrt(max(G_jj, 0))` per column, in f64 (what [`Order::build`] ranks by).
        norms: Vec<f64>,
    },
}

// `Ranked`'s norms are `sqrt(max(g, 0))`, never NaN (`max` drops a NaN), so equality is total.
impl Eq for Order {}

impl Order {
    /// Builds the order of `kind` for a row-major `rows × cols` weight and the Gram diagonal.
    pub fn build(kind: OrderKind, w: &[f32], rows: usize, cols: usize, diag: &[f64]) -> Order {
        match kind {
            OrderKind::Natural => Order::Natural { cols },
            OrderKind::Greedy => Order::PerRow {
                cols,
                perm: greedy_rows(w, rows, cols, &column_norms(diag)),
            },
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

    /// The greedy order of `diag`'s columns, to be built where the weights are
    /// ([`Order::Ranked`]); [`Order::resolve`] with the weights gives what [`Order::build`] does.
    pub fn ranked(diag: &[f64]) -> Order {
        Order::Ranked {
            cols: diag.len(),
            norms: column_norms(diag),
        }
    }

    /// This order with a [`Order::Ranked`] one built for the row-major `rows × cols` weights `w`
    /// (as [`Order::PerRow`]); any other order as it is.
    pub fn resolve(&self, w: &[f32], rows: usize) -> std::borrow::Cow<'_, Order> {
        match self {
            Order::Ranked { cols, norms } => std::borrow::Cow::Owned(Order::PerRow {
                cols: *cols,
                perm: greedy_rows(w, rows, *cols, norms),
            }),
            other => std::borrow::Cow::Borrowed(other),
        }
    }

    /// How a device holds this order: one index per weight for [`Order::PerRow`] and
    /// [`Order::Ranked`] alike, one per column for [`Order::Shared`], none for
    /// [`Order::Natural`].
    pub fn layout(&self) -> OrderLayout {
        match self {
            Order::Natural { .. } => OrderLayout::Natural,
            Order::Shared { .. } => OrderLayout::Shared,
            Order::PerRow { .. } | Order::Ranked { .. } => OrderLayout::PerRow,
        }
    }

    /// Whether a device holds `self` and `other` in the same form ([`Order::layout`]).
    pub fn same_layout(&self, other: &Order) -> bool {
        self.layout() == other.layout()
    }

    /// The column visited at step `t` of row `row`. A [`Order::Ranked`] order is resolved
    /// first ([`Order::resolve`]); asking it panics.
    #[inline]
    pub fn at(&self, row: usize, t: usize) -> usize {
        match self {
            Order::Natural { .. } => t,
            Order::Shared { perm, .. } => perm[t] as usize,
            Order::PerRow { cols, perm } => perm[row * cols + t] as usize,
            Order::Ranked { .. } => unreachable!("a ranked order is resolved before it is walked"),
        }
    }

    /// The full `rows × cols` permutation table, materialised (what GPU devices upload).
    pub fn table(&self, rows: usize) -> Vec<u32> {
        match self {
            Order::Natural { cols } => (0..rows).flat_map(|_| 0..*cols as u32).collect(),
            Order::Shared { perm, .. } => (0..rows).flat_map(|_| perm.iter().copied()).collect(),
            Order::PerRow { perm, .. } => perm.clone(),
            Order::Ranked { .. } => unreachable!("a ranked order is resolved before its table"),
        }
    }
}

/// `sqrt(max(G_jj, 0))` per column: the greedy order's input norms.
fn column_norms(diag: &[f64]) -> Vec<f64> {
    diag.iter().map(|&g| g.max(0.0).sqrt()).collect()
}

/// Per row, the columns by `|W_ij|·norms[j]` descending (ties by index): the greedy order.
/// An integer that orders as `f64::total_cmp` orders the floats (its own definition).
fn total_order_key(x: f64) -> i64 {
    let bits = x.to_bits() as i64;
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
}

fn greedy_rows(w: &[f32], rows: usize, cols: usize, norms: &[f64]) -> Vec<u32> {
    use rayon::prelude::*;
    let mut perm = vec![0u32; rows * cols];
    // Rows are independent sorts: in parallel, each writing its own slice.
    perm.par_chunks_mut(cols.max(1))
        .zip(w.par_chunks(cols.max(1)))
        .for_each_init(
            || Vec::with_capacity(cols),
            |keyed: &mut Vec<(i64, u32)>, (idx, row)| {
                // Descending score, equal scores in ascending index order: the stable sort by
                // `total_cmp`, as one unstable sort on (score's total-order key, index) pairs,
                // which are all distinct (twice as fast as comparing through the index).
                keyed.clear();
                keyed.extend(
                    row.iter()
                        .zip(norms)
                        .enumerate()
                        .map(|(j, (&v, &g))| (total_order_key((v as f64).abs() * g), j as u32)),
                );
                keyed.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                for (x, &(_, j)) in idx.iter_mut().zip(keyed.iter()) {
                    *x = j;
                }
            },
        );
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows' order is the stable sort by descending score, on rows full of ties, zero and
    /// negative-zero norms.
    #[test]
    fn the_greedy_rows_are_the_stable_sort() {
        let (rows, cols) = (40, 97);
        let mut rng = crate::util::rng::SplitMix::new(11);
        let mut next = move || rng.next_u64();
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| [0.0f32, -0.0, 0.5, -0.5, 1.0, 3.0][(next() % 6) as usize])
            .collect();
        let norms: Vec<f64> = (0..cols)
            .map(|_| [0.0, -0.0, 1.0, 2.0, 0.5][(next() % 5) as usize])
            .collect();
        let got = greedy_rows(&w, rows, cols, &norms);
        for r in 0..rows {
            let score: Vec<f64> = (0..cols)
                .map(|j| (w[r * cols + j] as f64).abs() * norms[j])
                .collect();
            let mut want: Vec<u32> = (0..cols as u32).collect();
            want.sort_by(|&a, &b| score[b as usize].total_cmp(&score[a as usize]));
            assert_eq!(&got[r * cols..(r + 1) * cols], &want[..], "row {r}");
        }
    }

    /// The sort key orders as `total_cmp` does, signed zeros, infinities and NaNs included.
    #[test]
    fn the_sort_key_is_the_total_order() {
        let v = [
            f64::NEG_INFINITY,
            -1.5,
            -0.0,
            0.0,
            f64::MIN_POSITIVE,
            2.0,
            f64::INFINITY,
            f64::NAN,
            -f64::NAN,
            1e-310,
            -1e-310,
        ];
        for a in v {
            for b in v {
                assert_eq!(
                    total_order_key(a).cmp(&total_order_key(b)),
                    a.total_cmp(&b),
                    "{a:e} vs {b:e}"
                );
            }
        }
    }

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
    fn a_ranked_order_resolves_to_the_built_greedy_order() {
        // Ties, a dead input (0) and a negative diagonal entry (ranked as 0).
        let w = [0.5f32, -2.0, 0.5, 1.0, 0.0, 3.0, -3.0, 1.0];
        let diag = [1.0, 1.0, 0.0, -2.0];
        let built = Order::build(OrderKind::Greedy, &w, 2, 4, &diag);
        let ranked = Order::ranked(&diag);
        assert!(ranked.same_layout(&built) && !ranked.same_layout(&Order::Natural { cols: 4 }));
        assert_eq!(&*ranked.resolve(&w, 2), &built);
        assert_eq!(built.table(2), vec![1, 0, 2, 3, 1, 0, 2, 3]);
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
