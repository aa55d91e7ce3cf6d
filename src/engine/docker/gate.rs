//! Holds an install's loads to the lean peak its check counted
//! ([`LoadBudget`]): a load waits until the disk held on Docker's volume,
//! with it, stays within that peak, and every load still to start fits
//! after it, one by one. Two images load at once while little is applied;
//! the last loads, when the volume is fullest, go one by one.

use std::sync::{Arc, Mutex};

use crate::Digest;
use crate::plan::held::{BudgetState, LoadBudget, LoadKey};

/// Shared by every load of one install.
#[derive(Debug)]
pub struct LoadGate {
    state: Mutex<BudgetState>,
    changed: tokio::sync::Notify,
}

impl LoadGate {
    pub fn new(budget: LoadBudget) -> Arc<LoadGate> {
        Arc::new(LoadGate {
            state: Mutex::new(BudgetState::new(budget)),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until the load of layer `index` of image `image` may start,
    /// or stream its archive early ([`LoadPermit::is_early`]; see
    /// [`BudgetState::admits_early`]). The permit ends it:
    /// [`LoadPermit::applied`] once the engine holds the layer; dropped
    /// otherwise (the load failed: nothing applied).
    pub async fn admit(self: &Arc<Self>, image: &Digest, index: usize) -> LoadPermit {
        let key: LoadKey = (image.clone(), index);
        let mut waited = false;
        loop {
            // Registered before the state is read: an end in between wakes it.
            let changed = self.changed.notified();
            if let Some(early) = self.try_start(&key, waited) {
                return LoadPermit {
                    gate: self.clone(),
                    key: Some(key),
                    early,
                };
            }
            waited = true;
            changed.await;
        }
    }

    /// Starts `key` when it may start (`Some(false)`) or stream early
    /// (`Some(true)`).
    fn try_start(&self, key: &LoadKey, waited: bool) -> Option<bool> {
        let mut state = self.state();
        let early = if state.admits(key) {
            false
        } else if state.admits_early(key) {
            true
        } else {
            return None;
        };
        tracing::debug!(
            "load of layer {} of {} {}{}: {}",
            key.1,
            key.0,
            if early { "streams early" } else { "starts" },
            if waited {
                " after waiting for room"
            } else {
                ""
            },
            state.describe()
        );
        if early {
            state.start_early(key.clone());
        } else {
            state.start(key.clone());
        }
        Some(early)
    }

    /// Marks `key`, streaming early, applied now when it may be.
    fn try_apply(&self, key: &LoadKey) -> bool {
        let mut state = self.state();
        if !state.admits_apply(key) {
            return false;
        }
        tracing::debug!(
            "load of layer {} of {} is applied now: {}",
            key.1,
            key.0,
            state.describe()
        );
        state.apply(key);
        true
    }

    /// Waits until the load of layer `index` of image `image` ended:
    /// whether the engine holds the layer (applied, or held already).
    pub async fn applied(&self, image: &Digest, index: usize) -> bool {
        let key: LoadKey = (image.clone(), index);
        loop {
            let changed = self.changed.notified();
            if let Some(held) = self.state().ended(&key) {
                return held;
            }
            changed.await;
        }
    }

    /// Layers `..held` of image `image` are held by the engine: not loaded.
    pub fn skip(&self, image: &Digest, held: usize) {
        let mut state = self.state();
        for index in 0..held {
            state.skip((image.clone(), index));
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Every load of image `image` ended (it is whole, or it failed).
    pub fn image_done(&self, image: &Digest) {
        self.state().image_done(image);
        self.changed.notify_waiters();
    }

    fn end(&self, key: &LoadKey, applied: bool) {
        self.state().end(key, applied);
        self.changed.notify_waiters();
    }
}

/// One admitted load.
#[derive(Debug)]
pub struct LoadPermit {
    gate: Arc<LoadGate>,
    key: Option<LoadKey>,
    /// Admitted to stream its archive only: it waits for
    /// [`Self::until_apply`] before the archive may end.
    early: bool,
}

impl LoadPermit {
    /// Whether the load may only stream its archive so far.
    pub fn is_early(&self) -> bool {
        self.early
    }

    /// Waits until the load, streaming early, may be applied (the others
    /// running ended, or left room); then it counts as applying.
    pub async fn until_apply(&mut self) {
        let Some(key) = self.key.clone() else {
            return;
        };
        while self.early {
            let changed = self.gate.changed.notified();
            if self.gate.try_apply(&key) {
                self.early = false;
                break;
            }
            changed.await;
        }
        self.gate.changed.notify_waiters();
    }

    /// The engine holds the layer now.
    pub fn applied(mut self) {
        if let Some(key) = self.key.take() {
            self.gate.end(&key, true);
        }
    }
}

impl Drop for LoadPermit {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.gate.end(&key, false);
        }
    }
}
