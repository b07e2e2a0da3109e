//! Field values as log lines show them: timings rounded to the microsecond.
//!
//! A duration computed as `elapsed().as_secs_f64() * 1000.0` carries binary
//! noise (`total_ms=1.0543550000000002`) that says nothing and costs columns.
//! Fields named `*_ms` are rounded to 3 decimals, `*_s`, `*_secs` and
//! `*_seconds` to 6, in both formats (the JSON formatter calls
//! [`round_timing`]; the text one uses [`RoundedFields`]).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// `value` rounded to the microsecond when `name` says it is a timing.
pub fn round_timing(name: &str, value: f64) -> f64 {
    let per_unit = if name.ends_with("_ms") {
        1e3
    } else if name.ends_with("_s") || name.ends_with("_secs") || name.ends_with("_seconds") {
        1e6
    } else {
        return value;
    };
    if !value.is_finite() {
        return value;
    }
    (value * per_unit).round() / per_unit
}

/// The text format's fields (`tracing_subscriber`'s default), with
/// [`round_timing`] applied.
pub struct RoundedFields;

impl<'a> MakeVisitor<Writer<'a>> for RoundedFields {
    type Visitor = Rounded<DefaultVisitor<'a>>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        Rounded(DefaultVisitor::new(target, true))
    }
}

/// A visitor that rounds timings before handing them on.
pub struct Rounded<V>(V);

impl<V: Visit> Visit for Rounded<V> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.record_f64(field, round_timing(field.name(), value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.record_i64(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.record_u64(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.record_bool(field, value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.record_str(field, value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.record_error(field, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, value);
    }
}

impl<V: VisitOutput<fmt::Result>> VisitOutput<fmt::Result> for Rounded<V> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl<V: VisitFmt> VisitFmt for Rounded<V> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_rounded_to_the_microsecond() {
        assert_eq!(round_timing("total_ms", 1.054_355_000_000_000_2), 1.054);
        assert_eq!(round_timing("total_ms", 43.352_402_999_999_995), 43.352);
        assert_eq!(round_timing("took_s", 0.123_456_789), 0.123457);
        assert_eq!(round_timing("ratio", 0.123_456_789), 0.123_456_789);
        assert!(round_timing("x_ms", f64::NAN).is_nan());
    }
}
