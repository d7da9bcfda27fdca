//! WatchPrekeyStock: a server stream that tells a device its prekey stock while it is low, and
//! once when it stops being low, without polling. Claims and uploads on any replica wake it
//! ([`crate::store::events`]); it also reads again every [`REREAD_INTERVAL`], in case a wake-up
//! was lost.

use tonic::Status;

use super::prekeys::{current_stock, own_device, stock_to_wire};
use crate::auth::Principal;
use crate::crypto::ids::{DeviceId, UserId};
use crate::proto::keyhold::v1 as pb;
use crate::service::watch::{next_change, StreamSender};
use crate::service::AppState;
use crate::store::events::{DeviceWatch, EventKind};
use crate::store::prekeys::PrekeyStock;

/// Counter: WatchPrekeyStock messages that tell a device its one-time prekey stock is low.
pub(crate) const PREKEY_LOW_STOCK_EVENTS: &str = "keyhold_prekey_low_stock_events_total";

/// The stream WatchPrekeyStock answers with.
pub(super) type WatchPrekeyStockStream =
    tokio_stream::wrappers::ReceiverStream<Result<pb::WatchPrekeyStockResponse, Status>>;

/// WatchPrekeyStock: checks the call, listens for changes, and starts the stream.
pub(super) async fn watch(
    state: &AppState,
    caller: &Principal,
    req: pb::WatchPrekeyStockRequest,
) -> Result<WatchPrekeyStockStream, Status> {
    let (user, device) = own_device(caller, &req.user_id, &req.device_id)?;
    let slot = state.streams.claim(
        &state.store,
        caller.token_id(),
        &user,
        &device,
        state.limits.max_watch_streams_per_device,
    )?;
    // Refuse at once, rather than as the stream's first item, a device without keys.
    super::device_keys::current_identity_key(state, &user, &device).await?;
    let low_water = match req.low_water {
        0 => (state.limits.max_unused_prekeys / 10).max(1) as u64,
        n => u64::from(n),
    };
    // Listen before the first read, so no claim committed after it is missed.
    let watch = state
        .store
        .watch_device(EventKind::Prekeys, &user, &device)
        .await?;
    let state = state.clone();
    Ok(state.streams.clone().spawn(slot, move |tx| {
        send_while_low(state, user, device, low_water, watch, tx)
    }))
}

/// The body of a WatchPrekeyStock stream: send the stock when it changes while low, and once
/// when it stops being low. A failure is the stream's last item.
async fn send_while_low(
    state: AppState,
    user: UserId,
    device: DeviceId,
    low_water: u64,
    mut watch: DeviceWatch,
    tx: StreamSender<pb::WatchPrekeyStockResponse>,
) {
    let mut last: Option<PrekeyStock> = None;
    loop {
        let stock = match current_stock(&state, &user, &device).await {
            Ok(stock) => stock,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let low = stock.one_time < low_water;
        let was_low = last.is_some_and(|l| l.one_time < low_water);
        if last != Some(stock) && (last.is_none() || low || was_low) {
            let message = pb::WatchPrekeyStockResponse {
                stock: Some(stock_to_wire(stock, state.limits.max_unused_prekeys)),
                low,
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
            if low {
                metrics::counter!(PREKEY_LOW_STOCK_EVENTS).increment(1);
            }
        }
        last = Some(stock);
        if !next_change(&mut watch, &tx).await {
            return;
        }
    }
}
