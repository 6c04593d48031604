//! The algorithm on a device chosen at run time. These are inherent methods of
//! [`AnyDevice`] written here, in the algorithm's layer, so the devices never import it.

use super::prefactor::FactorCache;
use super::search::{search_by, Choice, ChooseBy, SearchPlan};
use super::{quantize_layer_any, Gram, LayerOutcome, QuantConfig};
use crate::device::AnyDevice;
use crate::error::Result;

impl AnyDevice {
    /// Quantizes one layer on this device (see [`super::quantize_layer`]).
    pub fn quantize_layer(
        &self,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        gram: &Gram,
        cfg: &QuantConfig,
    ) -> Result<LayerOutcome> {
        quantize_layer_any(self, name, w, rows, cols, gram, cfg)
    }

    /// Searches the candidates of `plan` for one layer on this device (see
    /// [`super::search::search`]).
    #[allow(clippy::too_many_arguments)]
    pub fn search(
        &self,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        gram: &Gram,
        holdout: Option<&Gram>,
        cfg: &QuantConfig,
        plan: &SearchPlan,
    ) -> Result<Choice> {
        self.search_with(name, w, rows, cols, gram, holdout, cfg, plan, None)
    }

    /// [`AnyDevice::search`] with the GPTQ factors built ahead in `factors` (see
    /// [`super::search::search_with`]).
    #[allow(clippy::too_many_arguments)]
    pub fn search_with(
        &self,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        gram: &Gram,
        holdout: Option<&Gram>,
        cfg: &QuantConfig,
        plan: &SearchPlan,
        factors: Option<&FactorCache>,
    ) -> Result<Choice> {
        self.search_by(
            name,
            w,
            rows,
            cols,
            gram,
            holdout,
            cfg,
            plan,
            factors,
            ChooseBy::Layer,
        )
    }

    /// [`AnyDevice::search_with`], shipping by `choose` (see [`super::search::search_by`]).
    #[allow(clippy::too_many_arguments)]
    pub fn search_by(
        &self,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        gram: &Gram,
        holdout: Option<&Gram>,
        cfg: &QuantConfig,
        plan: &SearchPlan,
        factors: Option<&FactorCache>,
        choose: ChooseBy,
    ) -> Result<Choice> {
        match self {
            AnyDevice::Cpu(d) => search_by(
                d, name, w, rows, cols, gram, holdout, cfg, plan, factors, choose,
            ),
            AnyDevice::Wgpu(d) => search_by(
                d.as_ref(),
                name,
                w,
                rows,
                cols,
                gram,
                holdout,
                cfg,
                plan,
                factors,
                choose,
            ),
        }
    }
}
