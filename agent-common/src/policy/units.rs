//! The units users write in a policy: durations (`250ms`), percentages (`50%`) and rates
//! (`10000/s`, `100Mbit/s`, `12MB/s`).
//!
//! Pure string -> value functions, so every rule about units lives (and is tested) here and
//! the decoder only attaches positions to their errors.
//!
//! Rate prefixes are SI, as network equipment and `tc` use them: `k`/`K` = 1000, `M` = 10^6,
//! `G` = 10^9, `T` = 10^12. The binary prefixes `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024) are
//! accepted too, for users who size in memory units. `bit` counts bits, `B` bytes; a bit rate
//! is stored in bytes per second, rounded down, because the datapath charges frame bytes.

use std::fmt;
use std::time::Duration;

/// Why a unit string was refused. `Display` is the message users see after the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty {what}; expected e.g. {example}")]
    Empty {
        what: &'static str,
        example: &'static str,
    },
    #[error("must not be negative")]
    Negative,
    #[error("`{text}` has no unit; expected e.g. {example}")]
    MissingUnit { text: String, example: &'static str },
    #[error("unknown unit `{unit}` in `{text}`; expected {expected}")]
    UnknownUnit {
        unit: String,
        text: String,
        expected: &'static str,
    },
    #[error("`{text}` is not a number followed by a unit; expected e.g. {example}")]
    BadNumber { text: String, example: &'static str },
    #[error("`{0}` is too large")]
    Overflow(String),
    #[error("must be between 0% and 100%")]
    PercentRange,
    #[error("`{0}` has more than 4 decimal places")]
    TooPrecise(String),
    #[error("a packet rate counts whole packets; `{0}` has a fraction")]
    FractionalPackets(String),
    #[error("`{0}` rounds down to 0 bytes per second")]
    RoundsToZero(String),
}

const DURATION_EXAMPLE: &str = "250ms, 1s or 2m";
const DURATION_UNITS: &str = "ns, us, ms, s, m or h";
const PERCENT_EXAMPLE: &str = "50% or 12.5%";
const RATE_EXAMPLE: &str = "10000/s, 100Mbit/s or 12MB/s";
const RATE_UNITS: &str =
    "/s (packets), or bit/s or B/s with an optional k, M, G, T, Ki, Mi, Gi or Ti prefix";

/// Value of a non-negative decimal (`12`, `1.5`, `.5`) times `scale`, rounded down.
/// `None` when `text` is not such a decimal or the product does not fit `u128`.
fn scaled(text: &str, scale: u128) -> Option<u128> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 18 {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let denom = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let whole = int.checked_mul(scale)?;
    let part = frac_value.checked_mul(scale)? / denom;
    whole.checked_add(part)
}

/// Splits `12.5Mbit` into (`12.5`, `Mbit`).
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    text.split_at(end)
}

/// Parses a duration: one or more `NUMBER UNIT` pairs (`1m30s`, `1.5s`), units `ns`, `us`
/// (or `µs`), `ms`, `s`, `m`, `h`. A bare number is refused: `timeout: 5` could mean seconds
/// or milliseconds, and guessing is how outages start.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    if text.is_empty() {
        return Err(UnitError::Empty {
            what: "duration",
            example: DURATION_EXAMPLE,
        });
    }
    if text.starts_with('-') {
        return Err(UnitError::Negative);
    }
    let bad = || UnitError::BadNumber {
        text: text.to_owned(),
        example: DURATION_EXAMPLE,
    };
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let (number, after) = split_number(rest);
        if number.is_empty() {
            return Err(bad());
        }
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let ns_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(UnitError::MissingUnit {
                    text: text.to_owned(),
                    example: DURATION_EXAMPLE,
                });
            }
            _ => {
                return Err(UnitError::UnknownUnit {
                    unit: unit.to_owned(),
                    text: text.to_owned(),
                    expected: DURATION_UNITS,
                });
            }
        };
        let ns = scaled(number, ns_per_unit).ok_or_else(bad)?;
        total = total
            .checked_add(ns)
            .ok_or_else(|| UnitError::Overflow(text.to_owned()))?;
        rest = next;
    }
    let ns = u64::try_from(total).map_err(|_| UnitError::Overflow(text.to_owned()))?;
    Ok(Duration::from_nanos(ns))
}

/// A share between 0% and 100%, exact to 4 decimal places (stored in millionths), so that
/// percentages compare and hash exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Percent {
    millionths: u32,
}

impl Percent {
    /// 100%.
    pub const FULL: Percent = Percent {
        millionths: 1_000_000,
    };

    /// `None` above 100%.
    pub const fn from_millionths(millionths: u32) -> Option<Percent> {
        if millionths > 1_000_000 {
            None
        } else {
            Some(Percent { millionths })
        }
    }

    /// Whole percent, for constants (`Percent::whole(50)` is 50%). Saturates at 100%.
    pub const fn whole(percent: u32) -> Percent {
        let p = if percent > 100 { 100 } else { percent };
        Percent {
            millionths: p * 10_000,
        }
    }

    pub const fn millionths(self) -> u32 {
        self.millionths
    }

    /// The share as a fraction between 0.0 and 1.0.
    pub fn fraction(self) -> f64 {
        f64::from(self.millionths) / 1_000_000.0
    }

    pub const fn is_zero(self) -> bool {
        self.millionths == 0
    }

    /// `self` of `n`, rounded down (e.g. how many of `n` backends may be ejected).
    pub fn of(self, n: u64) -> u64 {
        let v = u128::from(n) * u128::from(self.millionths) / 1_000_000;
        u64::try_from(v).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.millionths / 10_000;
        let frac = self.millionths % 10_000;
        if frac == 0 {
            write!(f, "{whole}%")
        } else {
            let frac = format!("{frac:04}");
            write!(f, "{whole}.{}%", frac.trim_end_matches('0'))
        }
    }
}

/// Parses `50%`, `12.5%`, `0%`, `100%`.
pub fn parse_percent(text: &str) -> Result<Percent, UnitError> {
    if text.is_empty() {
        return Err(UnitError::Empty {
            what: "percentage",
            example: PERCENT_EXAMPLE,
        });
    }
    if text.starts_with('-') {
        return Err(UnitError::Negative);
    }
    let Some(number) = text.strip_suffix('%') else {
        let (_, unit) = split_number(text);
        return Err(if unit.is_empty() {
            UnitError::MissingUnit {
                text: text.to_owned(),
                example: PERCENT_EXAMPLE,
            }
        } else {
            UnitError::BadNumber {
                text: text.to_owned(),
                example: PERCENT_EXAMPLE,
            }
        });
    };
    let bad = || UnitError::BadNumber {
        text: text.to_owned(),
        example: PERCENT_EXAMPLE,
    };
    if number
        .split_once('.')
        .is_some_and(|(_, frac)| frac.len() > 4)
    {
        if scaled(number, 1).is_none() {
            return Err(bad());
        }
        return Err(UnitError::TooPrecise(text.to_owned()));
    }
    let millionths = scaled(number, 10_000).ok_or_else(bad)?;
    u32::try_from(millionths)
        .ok()
        .and_then(Percent::from_millionths)
        .ok_or(UnitError::PercentRange)
}

/// A rate as the datapath enforces it: packets per second, or bytes per second (bit rates
/// are converted, rounding down). Never 0 once parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    Packets(u64),
    Bytes(u64),
}

impl Rate {
    /// Units (packets or bytes) per second.
    pub const fn per_second(self) -> u64 {
        match self {
            Rate::Packets(n) | Rate::Bytes(n) => n,
        }
    }

    pub const fn is_bytes(self) -> bool {
        matches!(self, Rate::Bytes(_))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Packets(n) => write!(f, "{n}/s"),
            Rate::Bytes(n) => write!(f, "{n}B/s"),
        }
    }
}

/// Parses `10000/s` (packets), `100Mbit/s`, `500kbit/s`, `1.5Gbit/s` (bits), `12MB/s`,
/// `64KB/s`, `1MiB/s` (bytes). `0/s` parses to a zero rate: whether 0 is allowed is the
/// caller's rule (it reports "must be greater than 0" at the field).
pub fn parse_rate(text: &str) -> Result<Rate, UnitError> {
    if text.is_empty() {
        return Err(UnitError::Empty {
            what: "rate",
            example: RATE_EXAMPLE,
        });
    }
    if text.starts_with('-') {
        return Err(UnitError::Negative);
    }
    let bad = || UnitError::BadNumber {
        text: text.to_owned(),
        example: RATE_EXAMPLE,
    };
    let (number, unit) = split_number(text);
    if number.is_empty() {
        return Err(bad());
    }
    if unit.is_empty() {
        return Err(UnitError::MissingUnit {
            text: text.to_owned(),
            example: RATE_EXAMPLE,
        });
    }
    let unknown = || UnitError::UnknownUnit {
        unit: unit.to_owned(),
        text: text.to_owned(),
        expected: RATE_UNITS,
    };
    let per_unit = unit.strip_suffix("/s").ok_or_else(unknown)?;
    if per_unit.is_empty() {
        if number.contains('.') {
            return Err(UnitError::FractionalPackets(text.to_owned()));
        }
        let n = scaled(number, 1).ok_or_else(bad)?;
        let n = u64::try_from(n).map_err(|_| UnitError::Overflow(text.to_owned()))?;
        return Ok(Rate::Packets(n));
    }
    let (prefix, bits) = if let Some(p) = per_unit.strip_suffix("bit") {
        (p, true)
    } else if let Some(p) = per_unit.strip_suffix('B') {
        (p, false)
    } else {
        return Err(unknown());
    };
    let multiplier: u128 = match prefix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(unknown()),
    };
    let units = scaled(number, multiplier).ok_or_else(bad)?;
    let bytes = if bits { units / 8 } else { units };
    let bytes = u64::try_from(bytes).map_err(|_| UnitError::Overflow(text.to_owned()))?;
    if bytes == 0 && units != 0 {
        return Err(UnitError::RoundsToZero(text.to_owned()));
    }
    Ok(Rate::Bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("1s"), Ok(ms(1000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("15us"), Ok(Duration::from_micros(15)));
        assert_eq!(parse_duration("15µs"), Ok(Duration::from_micros(15)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("300s"), Ok(ms(300_000)));
    }

    #[test]
    fn bad_durations() {
        assert!(matches!(parse_duration(""), Err(UnitError::Empty { .. })));
        assert_eq!(parse_duration("-1s"), Err(UnitError::Negative));
        assert!(matches!(
            parse_duration("5"),
            Err(UnitError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_duration("5d"),
            Err(UnitError::UnknownUnit { unit, .. }) if unit == "d"
        ));
        assert!(matches!(
            parse_duration("5 s"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(UnitError::BadNumber { .. })
        ));
        assert!(matches!(
            parse_duration("1.2.3s"),
            Err(UnitError::BadNumber { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(UnitError::Overflow(_))
        ));
        assert_eq!(
            parse_duration("5").unwrap_err().to_string(),
            "`5` has no unit; expected e.g. 250ms, 1s or 2m"
        );
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("50%"), Ok(Percent::whole(50)));
        assert_eq!(parse_percent("0%"), Ok(Percent::whole(0)));
        assert_eq!(parse_percent("100%"), Ok(Percent::FULL));
        assert_eq!(parse_percent("12.5%").map(Percent::millionths), Ok(125_000));
        assert_eq!(parse_percent("0.0001%").map(Percent::millionths), Ok(1));
        assert_eq!(parse_percent("12.5%").unwrap().to_string(), "12.5%");
        assert_eq!(Percent::whole(50).to_string(), "50%");
        assert_eq!(Percent::whole(50).of(5), 2);
        assert!((Percent::whole(25).fraction() - 0.25).abs() < 1e-12);
    }

    #[test]
    fn bad_percentages() {
        assert_eq!(parse_percent("101%"), Err(UnitError::PercentRange));
        assert_eq!(parse_percent("100.5%"), Err(UnitError::PercentRange));
        assert_eq!(parse_percent("-1%"), Err(UnitError::Negative));
        assert!(matches!(
            parse_percent("50"),
            Err(UnitError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_percent("%"),
            Err(UnitError::BadNumber { .. })
        ));
        assert!(matches!(
            parse_percent("fifty%"),
            Err(UnitError::BadNumber { .. })
        ));
        assert!(matches!(
            parse_percent("1.23456%"),
            Err(UnitError::TooPrecise(_))
        ));
        assert!(matches!(
            parse_percent("50 percent"),
            Err(UnitError::BadNumber { .. })
        ));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10000/s"), Ok(Rate::Packets(10_000)));
        assert_eq!(parse_rate("0/s"), Ok(Rate::Packets(0)));
        assert_eq!(parse_rate("100Mbit/s"), Ok(Rate::Bytes(12_500_000)));
        assert_eq!(parse_rate("1Gbit/s"), Ok(Rate::Bytes(125_000_000)));
        assert_eq!(parse_rate("1.5Gbit/s"), Ok(Rate::Bytes(187_500_000)));
        assert_eq!(parse_rate("500kbit/s"), Ok(Rate::Bytes(62_500)));
        assert_eq!(parse_rate("500Kbit/s"), Ok(Rate::Bytes(62_500)));
        assert_eq!(parse_rate("12MB/s"), Ok(Rate::Bytes(12_000_000)));
        assert_eq!(parse_rate("64KB/s"), Ok(Rate::Bytes(64_000)));
        assert_eq!(parse_rate("64KiB/s"), Ok(Rate::Bytes(65_536)));
        assert_eq!(parse_rate("1Mibit/s"), Ok(Rate::Bytes(131_072)));
        assert_eq!(parse_rate("2TB/s"), Ok(Rate::Bytes(2_000_000_000_000)));
        assert_eq!(parse_rate("1500B/s"), Ok(Rate::Bytes(1500)));
        // Rounds down: 12 bits are 1.5 bytes.
        assert_eq!(parse_rate("12bit/s"), Ok(Rate::Bytes(1)));
        assert_eq!(parse_rate("0bit/s"), Ok(Rate::Bytes(0)));
        assert_eq!(Rate::Bytes(5).to_string(), "5B/s");
        assert_eq!(Rate::Packets(5).to_string(), "5/s");
    }

    #[test]
    fn bad_rates() {
        assert_eq!(
            parse_rate("7bit/s"),
            Err(UnitError::RoundsToZero("7bit/s".into()))
        );
        assert_eq!(parse_rate("-5/s"), Err(UnitError::Negative));
        assert!(matches!(parse_rate(""), Err(UnitError::Empty { .. })));
        assert!(matches!(
            parse_rate("10000"),
            Err(UnitError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_rate("100Mbps"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_rate("100Xbit/s"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_rate("10/m"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_rate("1.5/s"),
            Err(UnitError::FractionalPackets(_))
        ));
        assert!(matches!(parse_rate("/s"), Err(UnitError::BadNumber { .. })));
        assert!(matches!(
            parse_rate("99999999999999999999/s"),
            Err(UnitError::Overflow(_))
        ));
        assert!(matches!(
            parse_rate("99999999999TB/s"),
            Err(UnitError::Overflow(_))
        ));
    }
}
