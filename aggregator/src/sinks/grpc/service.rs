use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use dashmap::DashMap;
use futures::Stream;
use tapestry_proto::tool::v1::tool_subscribe_server::ToolSubscribe;
use tapestry_proto::tool::v1::{SubscribeRequest, ToolBatch};
use tonic::{Request, Response, Status};

use crate::sinks::{admit, Hub, Refusal, ToolAccess};

/// A running gRPC sink, looked up by the subscribe service.
#[derive(Clone)]
pub struct GrpcTool {
    pub hub: Arc<Hub<Arc<ToolBatch>>>,
    pub token: ToolAccess,
}

pub type Hubs = Arc<DashMap<String, GrpcTool>>;

pub struct SubscribeService {
    pub hubs: Hubs,
}

#[tonic::async_trait]
impl ToolSubscribe for SubscribeService {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<ToolBatch, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let authorization = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let name = req.into_inner().sink;
        let tool = self
            .hubs
            .get(&name)
            .map(|h| h.clone())
            .ok_or_else(|| Status::not_found(format!("sink: no grpc sink named {name:?}")))?;
        admit(
            &name,
            &tool.token,
            authorization.as_deref(),
            peer,
            &tool.hub.stats,
        )
        .map_err(|r| match r {
            Refusal::Unauthenticated(m) => Status::unauthenticated(m),
            Refusal::NotAllowed(m) => Status::permission_denied(m),
        })?;
        let sub = tool
            .hub
            .subscribe()
            .map_err(|e| Status::resource_exhausted(format!("sink {name:?}: {e}")))?;
        let dropped = sub.dropped.clone();
        let stream = futures::stream::unfold(sub.rx, move |mut rx| {
            let dropped = dropped.clone();
            async move {
                let b = rx.recv().await?;
                let mut out = (*b).clone();
                out.dropped_since_last = dropped.swap(0, Relaxed);
                Some((Ok(out), rx))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
