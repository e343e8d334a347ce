//! Probe results of degradable services, for the degradation evaluator (`crate::degrade`):
//! the supervisor sends each batch's on a channel the evaluator drains every tick. Here, on
//! the sending side, so the supervisor does not depend on the evaluator.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

/// Batches of probe samples the channel holds; the supervisor drops a batch rather than wait
/// when the evaluator is this far behind.
pub const SAMPLE_BATCHES: usize = 1024;

/// One probe of one of a degradable service's own backends, as the supervisor saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSample {
    /// The service's name (the probe's `BackendRef::service`).
    pub service: Arc<str>,
    /// When the probe ended.
    pub at: Instant,
    /// The last attempt's duration; a timed-out probe's is at least the timeout.
    pub latency: Duration,
    pub ok: bool,
}

/// The supervisor's end of the samples channel: it sends each batch of probe results of
/// degradable services, never waiting (a full channel drops the batch).
pub type SampleTx = mpsc::Sender<Vec<ProbeSample>>;
/// The evaluator's end.
pub type SampleRx = mpsc::Receiver<Vec<ProbeSample>>;

/// The samples channel: made once for the evaluator's life; every supervisor (one per
/// policy with other backends) gets a clone of the sender.
pub fn sample_channel() -> (SampleTx, SampleRx) {
    mpsc::channel(SAMPLE_BATCHES)
}
