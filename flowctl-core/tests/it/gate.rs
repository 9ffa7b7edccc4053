use bytes::Bytes;
use flowctl_core::Watermarks;
use flowctl_core::gate::Gate;
#[allow(unused_imports)]
use flowctl_core::prelude::*;
use flowctl_core::weighted::MIN_CHARGE;

fn gate() -> Gate {
    Gate::new(Watermarks::new(0, 1000).unwrap(), tracing::Span::none())
}

/// Issue 15, "also fix": a credit of more than is buffered (a double credit)
/// was clamped silently in release builds. It is now counted in
/// `FlowStats::violations`, and debug builds (the tests) panic at the credit.
#[test]
fn a_double_credit_is_a_counted_invariant_violation() {
    let g = gate();
    let charge = g.charge_item(&Bytes::from_static(b"abc"));
    assert_eq!(charge, MIN_CHARGE);
    g.credit(charge);
    assert_eq!(g.stats().violations, 0);
    let second = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.credit(charge)));
    assert_eq!(
        second.is_err(),
        cfg!(debug_assertions),
        "debug builds panic at the double credit"
    );
    let s = g.stats();
    assert_eq!((s.violations, s.buffered), (1, 0), "{s:?}");
    // The gate still works after the violation.
    g.charge_item(&Bytes::from_static(b"abc"));
    g.credit(MIN_CHARGE);
    assert_eq!(g.stats().violations, 1);
}

/// An item's charge is its weight with a floor of `MIN_CHARGE`, and may be
/// credited in parts; `bytes` counts the payload.
#[test]
fn charge_item_floors_the_charge_and_counts_payload_bytes() {
    let g = gate();
    assert_eq!(g.charge_item(&()), MIN_CHARGE);
    assert_eq!(g.charge_item(&Bytes::from(vec![1u8; 500])), 500);
    let s = g.stats();
    assert_eq!((s.buffered, s.bytes, s.items), (MIN_CHARGE + 500, 500, 2));
    g.credit(200);
    g.credit(300 + MIN_CHARGE);
    let s = g.stats();
    assert_eq!((s.buffered, s.violations), (0, 0));
}
