//! The presets: what the tool's `default` recipe and the paper's recipe mean, as one function
//! from the user's choices to a full [`QuantConfig`], the search around it and the held-out
//! share. The command line and recipe files only fill in [`Choices`]; every default is decided
//! here.

use super::search::{
    ChooseBy, SearchPlan, AUTO_DAMPS, DEFAULT_DAMP, DEFAULT_HOLDOUT, DEFAULT_SCORE_DAMP,
};
use super::{Granularity, Init, Method, OrderKind, QuantConfig};
use crate::error::{Error, Result};

/// The recipe the other options start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The tool's recipe: GPTQ start, damping, the grid-shrink search, candidates chosen on
    /// held-out images.
    #[default]
    Default,
    /// The official COMQ recipe: one sweep from the float weights, fixed min/max grid, no
    /// damping, no held-out images.
    Paper,
}

crate::util::value_enum!(Preset {
    Default = "default",
    Paper = "paper",
});

/// How many candidates the default recipe's search tries per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// The line search over the grid shrink from one start per bit width, then the other
    /// damping, with RTN at scale 1 as the guard ([`SearchPlan::quick`]).
    #[default]
    Quick,
    /// Also every shrink from 1.0 to 0.8, RTN at each, and the paper's candidate
    /// ([`SearchPlan::full`]): about twice the runs, and on the models measured the same choices.
    Full,
}

crate::util::value_enum!(SearchMode {
    Quick = "quick",
    Full = "full",
});

/// The grid shrink the user asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    /// This shrink `c`.
    Fixed(f32),
    /// Chosen per layer by error (the search's shrinks).
    Auto,
}

impl std::str::FromStr for Scalar {
    type Err = Error;

    /// `auto` or a number.
    fn from_str(t: &str) -> Result<Scalar> {
        match t {
            "auto" => Ok(Scalar::Auto),
            _ => t.parse::<f32>().map(Scalar::Fixed).map_err(|_| {
                Error::InvalidOption(format!("--scalar '{t}' is neither a number nor 'auto'"))
            }),
        }
    }
}

/// What the user chose; every `None` (or `false`) is left to the preset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Choices {
    /// Bits per weight.
    pub bits: Option<u32>,
    /// Symmetric grid.
    pub sym: bool,
    /// Inputs per group (0: one grid per row).
    pub group_size: Option<usize>,
    /// Grid shrink.
    pub scalar: Option<Scalar>,
    /// Coordinate-descent sweeps.
    pub sweeps: Option<usize>,
    /// Where the sweeps start.
    pub init: Option<Init>,
    /// Damping `λ`.
    pub damp: Option<f32>,
    /// GPTQ visits inputs in index order (act-order off).
    pub no_act_order: bool,
    /// Share of the calibration images held out to choose among candidates.
    pub holdout: Option<f32>,
    /// Damping of the calibration Gram candidates are compared on without held-out images.
    pub score_damp: Option<f32>,
    /// How many candidates a grid-shrink search tries.
    pub search: Option<SearchMode>,
    /// Whether a search ships whole candidates or each row from its best one.
    pub choose: Option<ChooseBy>,
    /// Visiting order.
    pub order: Option<OrderKind>,
    /// Closed-form scale update after each sweep.
    pub scale_update: bool,
    /// One scale per channel or per layer.
    pub granularity: Option<Granularity>,
    /// COMQ or round-to-nearest.
    pub method: Option<Method>,
}

/// A preset applied to the user's choices.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Every option of the quantization.
    pub config: QuantConfig,
    /// The candidates searched per layer (`None`: one plain run, the paper's way).
    pub search: Option<SearchPlan>,
    /// Share of the calibration images held out to choose among the candidates.
    pub holdout: f32,
}

impl Preset {
    /// The full configuration, search and held-out share of this preset under `c`.
    pub fn resolve(self, c: &Choices) -> Result<Resolved> {
        let config = self.config(c);
        let (search, holdout) = self.search(c, &config)?;
        Ok(Resolved {
            config,
            search,
            holdout,
        })
    }

    /// What a search ships under this preset: the user's choice, else each row from its best
    /// candidate where the held-out images allow ([`ChooseBy::Auto`]); the paper preset ships
    /// whole candidates, as the reference recipe has none to choose among.
    pub fn choose(self, c: &Choices) -> ChooseBy {
        c.choose.unwrap_or(match self {
            Preset::Default => ChooseBy::Auto,
            Preset::Paper => ChooseBy::Layer,
        })
    }

    /// The quantization options: the user's where given, else the preset's.
    pub fn config(self, c: &Choices) -> QuantConfig {
        let d = QuantConfig::default();
        let paper = self == Preset::Paper;
        QuantConfig {
            bits: c.bits.unwrap_or(d.bits),
            sym: c.sym,
            group_size: c.group_size.filter(|&g| g > 0),
            scalar: match self.scalar(c) {
                Scalar::Fixed(s) => s,
                Scalar::Auto => 1.0,
            },
            init: c.init.unwrap_or(if paper { Init::W } else { Init::Gptq }),
            damp: c.damp.unwrap_or(if paper { 0.0 } else { DEFAULT_DAMP }),
            act_order: !c.no_act_order,
            sweeps: c.sweeps.unwrap_or(d.sweeps),
            order: c.order.unwrap_or(OrderKind::Greedy),
            scale_update: c.scale_update,
            granularity: c.granularity.unwrap_or(Granularity::Channel),
            method: c.method.unwrap_or(Method::Comq),
            ..d
        }
    }

    /// The grid shrink: the user's, else 1.0 for the paper and `auto` for the default.
    fn scalar(self, c: &Choices) -> Scalar {
        match (c.scalar, self) {
            (Some(s), _) => s,
            (None, Preset::Paper) => Scalar::Fixed(1.0),
            (None, Preset::Default) => Scalar::Auto,
        }
    }

    /// The search around `cfg` and the held-out share (`None`: one plain run).
    fn search(self, c: &Choices, cfg: &QuantConfig) -> Result<(Option<SearchPlan>, f32)> {
        let paper = self == Preset::Paper;
        let holdout = c
            .holdout
            .unwrap_or(if paper { 0.0 } else { DEFAULT_HOLDOUT });
        if !(0.0..0.9).contains(&holdout) {
            return Err(Error::InvalidOption(format!(
                "--holdout {holdout} must be in [0, 0.9)"
            )));
        }
        if cfg.method == Method::Rtn {
            return Ok((None, 0.0));
        }
        // Without an explicit damping, the default recipe also tries the other dampings.
        let damps = if c.damp.is_none() && !paper {
            AUTO_DAMPS.to_vec()
        } else {
            Vec::new()
        };
        let score_damp = c.score_damp.unwrap_or(DEFAULT_SCORE_DAMP);
        if !(score_damp.is_finite() && score_damp >= 0.0) {
            return Err(Error::InvalidOption(format!(
                "--score-damp {score_damp} must be a finite value ≥ 0"
            )));
        }
        let plan = match (self.scalar(c), paper) {
            (Scalar::Auto, _) => Some(match c.search.unwrap_or_default() {
                SearchMode::Quick => SearchPlan::quick(cfg.bits, damps, score_damp),
                SearchMode::Full => SearchPlan {
                    paper: !paper,
                    ..SearchPlan::full(damps, score_damp)
                },
            }),
            (Scalar::Fixed(_), true) if holdout == 0.0 => None,
            (Scalar::Fixed(_), paper) => Some(SearchPlan {
                paper: !paper,
                damps,
                score_damp,
                ..SearchPlan::single(cfg)
            }),
        };
        Ok((plan, holdout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_preset_is_the_reference_recipe_with_no_search() {
        let r = Preset::Paper.resolve(&Choices::default()).unwrap();
        assert_eq!(r.config, QuantConfig::default());
        assert_eq!((r.search, r.holdout), (None, 0.0));
    }

    #[test]
    fn the_default_preset_starts_from_gptq_damped_and_searches_on_held_out_images() {
        let r = Preset::Default.resolve(&Choices::default()).unwrap();
        assert_eq!(r.config.init, Init::Gptq);
        assert_eq!(r.config.damp, DEFAULT_DAMP);
        assert_eq!(r.config.scalar, 1.0);
        assert_eq!(r.holdout, DEFAULT_HOLDOUT);
        let s = r.search.unwrap();
        assert_eq!(
            s,
            SearchPlan::quick(4, AUTO_DAMPS.to_vec(), DEFAULT_SCORE_DAMP)
        );
        assert_eq!(s.scalars, vec![crate::quant::search::first_scalar(4)]);
        assert!(s.line_search && !s.paper && !s.rtn_scalars);
        // `--search full` tries every shrink, RTN at each and the paper's candidate.
        let full = Choices {
            search: Some(SearchMode::Full),
            ..Choices::default()
        };
        let s = Preset::Default.resolve(&full).unwrap().search.unwrap();
        assert_eq!(s, SearchPlan::full(AUTO_DAMPS.to_vec(), DEFAULT_SCORE_DAMP));
        assert_eq!(s.scalars, crate::quant::search::AUTO_SCALARS.to_vec());
        assert!(s.line_search && s.paper && s.rtn_scalars);
    }

    #[test]
    fn the_default_preset_chooses_rows_where_the_held_out_rows_allow_and_the_paper_never() {
        let none = Choices::default();
        assert_eq!(Preset::Default.choose(&none), ChooseBy::Auto);
        assert_eq!(Preset::Paper.choose(&none), ChooseBy::Layer);
        let row = Choices {
            choose: Some(ChooseBy::Row),
            ..Choices::default()
        };
        assert_eq!(Preset::Paper.choose(&row), ChooseBy::Row);
        // `auto` chooses rows from 4 held-out activation rows per input on.
        let held = |samples: u64| crate::numeric::gram::Gram {
            samples,
            ..crate::numeric::gram::Gram::identity(8)
        };
        assert!(!ChooseBy::Auto.by_row(8, Some(&held(31))));
        assert!(ChooseBy::Auto.by_row(8, Some(&held(32))));
        assert!(!ChooseBy::Auto.by_row(8, None));
        assert!(!ChooseBy::Row.by_row(8, None));
        assert!(ChooseBy::Row.by_row(8, Some(&held(1))));
        assert!(!ChooseBy::Layer.by_row(8, Some(&held(1 << 20))));
    }

    #[test]
    fn choices_win_over_either_preset() {
        let c = Choices {
            bits: Some(3),
            sym: true,
            group_size: Some(0),
            scalar: Some(Scalar::Fixed(0.9)),
            init: Some(Init::Rtn),
            damp: Some(0.5),
            no_act_order: true,
            order: Some(OrderKind::Shared),
            granularity: Some(Granularity::Layer),
            ..Choices::default()
        };
        for p in [Preset::Default, Preset::Paper] {
            let cfg = p.resolve(&c).unwrap().config;
            assert_eq!((cfg.bits, cfg.sym, cfg.group_size), (3, true, None));
            assert_eq!((cfg.scalar, cfg.init, cfg.damp), (0.9, Init::Rtn, 0.5));
            assert!(!cfg.act_order);
            assert_eq!(
                (cfg.order, cfg.granularity),
                (OrderKind::Shared, Granularity::Layer)
            );
        }
        // An explicit damping is not searched around; a fixed shrink with held-out images is
        // still scored against the paper's recipe under the default preset.
        let s = Preset::Default.resolve(&c).unwrap().search.unwrap();
        assert!(s.damps.is_empty() && s.paper);
        // The paper preset with a held-out share scores its one candidate there.
        let held = Choices {
            holdout: Some(0.2),
            ..Choices::default()
        };
        let r = Preset::Paper.resolve(&held).unwrap();
        assert_eq!(r.holdout, 0.2);
        assert!(r.search.is_some_and(|s| !s.paper));
    }

    #[test]
    fn rtn_searches_nothing_and_bad_values_are_refused() {
        let rtn = Choices {
            method: Some(Method::Rtn),
            ..Choices::default()
        };
        let r = Preset::Default.resolve(&rtn).unwrap();
        assert_eq!((r.search, r.holdout), (None, 0.0));
        let bad = Choices {
            holdout: Some(0.95),
            ..Choices::default()
        };
        let e = Preset::Default.resolve(&bad).unwrap_err().to_string();
        assert!(e.contains("--holdout 0.95"), "{e}");
        assert_eq!("auto".parse::<Scalar>().unwrap(), Scalar::Auto);
        assert_eq!("0.65".parse::<Scalar>().unwrap(), Scalar::Fixed(0.65));
        assert!("x".parse::<Scalar>().is_err());
    }
}
