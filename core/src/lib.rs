//! The Defuse method without any network: data readers, models, training, and (in
//! later modules) identify, distill and correct. Both the coordinator and the worker
//! link this crate; see DESIGN.md for the whole picture.
pub mod artifacts;
pub mod config;
pub mod correct;
pub mod data;
pub mod dpgmm;
pub mod error;
pub mod evaluate;
pub mod folder_copy;
pub mod frozen;
pub mod identify;
pub mod images;
pub mod layout;
pub mod limits;
pub mod models;
pub mod pictures;
pub mod pipeline;
pub mod planted;
pub mod plots;
pub mod progress;
pub mod report;
pub mod scenarios;
pub mod seeds;
pub mod sources;
pub mod table;
pub mod tensor_io;
pub mod threads;
pub mod train;
pub mod tsne;

pub use error::{Error, Result};

/// A fresh id for a process start (a worker, a coordinator): the host name plus a
/// random part, so a restarted process never inherits what its previous life held
/// (leases, the leader lease).
pub fn fresh_process_id() -> String {
    let host = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect::<String>();
    format!("{host}-{:08x}", rand::random::<u32>())
}
