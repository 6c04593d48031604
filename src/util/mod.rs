//! Leaf helpers with no knowledge of the algorithm, devices or files: the seeded generator and
//! hex digests.

pub mod rng;

/// Implements `clap::ValueEnum` for a unit enum of the library, each variant under the name
/// given (and with the help line given, if any), so the command line takes the library's own
/// types and no front end keeps a mirror enum to map.
macro_rules! value_enum {
    ($ty:ty { $($var:ident = $name:literal $(: $help:literal)?),+ $(,)? }) => {
        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(Self::$var),+]
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $(Self::$var => clap::builder::PossibleValue::new($name)$(.help($help))?),+
                })
            }
        }
    };
}
pub(crate) use value_enum;

/// `bytes` as lower-case hex, two digits a byte (how every digest in reports and fingerprints
/// is written).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_two_lower_case_digits_a_byte() {
        assert_eq!(super::hex(&[0, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
