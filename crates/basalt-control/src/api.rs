//! The REST API (axum) and its OpenAPI document (utoipa).
//!
//! Handlers are thin: decode, call [`Node`], encode. Every error is a JSON
//! [`ErrorBody`] with one human line and a fitting status code; a bad body or
//! an unknown name never changes anything.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Query};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use basalt_api::{
    ClusterNode, ClusterStatus, ConsoleChunk, CreateVdisk, CreateVm, Disk, ErrorBody, Health,
    IoCounters, MigrateVm, NodeStatus, ResizeVdisk, ResyncProgress, StopVm, StoredFile, Vdisk,
    VdiskReplica, VhostExport, Vm, VmMigration,
};
use utoipa::OpenApi;

use crate::node::Node;
use crate::{ControlError, metrics};

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Basalt API",
        description = "Manage a Basalt cluster through any node: disks, vdisks, their exports and VMs."
    ),
    paths(
        health,
        status,
        cluster_status,
        list_disks,
        list_vdisks,
        create_vdisk,
        get_vdisk,
        resize_vdisk,
        delete_vdisk,
        export_vhost,
        unexport_vhost,
        upload_content,
        list_vms,
        create_vm,
        get_vm,
        delete_vm,
        start_vm,
        stop_vm,
        restart_vm,
        migrate_vm,
        vm_console
    ),
    components(schemas(
        ErrorBody,
        Health,
        NodeStatus,
        ClusterStatus,
        ClusterNode,
        IoCounters,
        Disk,
        Vdisk,
        VdiskReplica,
        ResyncProgress,
        CreateVdisk,
        ResizeVdisk,
        VhostExport,
        StoredFile,
        CreateVm,
        StopVm,
        MigrateVm,
        Vm,
        VmMigration,
        ConsoleChunk
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `/api/openapi.json` serves and
/// what is checked into `docs/openapi.json`).
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = match &self {
            ControlError::Store(e) => match e {
                basalt_store::StoreError::NoSuchVdisk(_) => StatusCode::NOT_FOUND,
                basalt_store::StoreError::VdiskExists(_) => StatusCode::CONFLICT,
                basalt_store::StoreError::BadName(_) | basalt_store::StoreError::BadSize(_) => {
                    StatusCode::BAD_REQUEST
                }
                basalt_store::StoreError::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
                basalt_store::StoreError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Busy(_) => StatusCode::CONFLICT,
            ControlError::Cluster(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, ControlError> {
    payload
        .map(|Json(v)| v)
        .map_err(|e| ControlError::BadRequest(e.body_text()))
}

/// The router of the API, the metrics endpoint and the console.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/api/openapi.json", get(openapi))
        .route("/metrics", get(metrics_endpoint))
        .route("/api/v1/health", get(health))
        .route("/api/v1/status", get(status))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/debug/partition", axum::routing::put(set_partition))
        .route("/api/v1/disks", get(list_disks))
        .route("/api/v1/vdisks", get(list_vdisks).post(create_vdisk))
        .route("/api/v1/vdisks/{name}", get(get_vdisk).delete(delete_vdisk))
        .route("/api/v1/vdisks/{name}/resize", post(resize_vdisk))
        .route(
            "/api/v1/vdisks/{name}/vhost",
            post(export_vhost).delete(unexport_vhost),
        )
        .route(
            "/api/v1/vdisks/{name}/content",
            axum::routing::put(upload_content).layer(DefaultBodyLimit::max(MAX_UPLOAD)),
        )
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/api/v1/vms/{name}/start", post(start_vm))
        .route("/api/v1/vms/{name}/stop", post(stop_vm))
        .route("/api/v1/vms/{name}/restart", post(restart_vm))
        .route("/api/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/api/v1/vms/{name}/console", get(vm_console))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(node)
}

async fn not_found() -> Response {
    ControlError::NotFound("no such API path".into()).into_response()
}

async fn method_not_allowed(method: axum::http::Method) -> Response {
    let body = ErrorBody {
        error: format!("method {method} is not allowed on this path"),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

async fn console() -> Html<&'static str> {
    Html(include_str!("console.html"))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

async fn metrics_endpoint(State(node): State<Arc<Node>>) -> Response {
    match metrics::render(&node) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ControlError::Internal(e.to_string()).into_response(),
    }
}

/// Liveness: 200 once the daemon serves.
#[utoipa::path(get, path = "/api/v1/health", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// The node at a glance.
#[utoipa::path(get, path = "/api/v1/status", responses((status = 200, body = NodeStatus)))]
async fn status(State(node): State<Arc<Node>>) -> Json<NodeStatus> {
    Json(node.status())
}

/// The cluster: members, their state and Raft roles, as this node sees it.
#[utoipa::path(get, path = "/api/v1/cluster", responses((status = 200, body = ClusterStatus)))]
async fn cluster_status(
    State(node): State<Arc<Node>>,
) -> Result<Json<ClusterStatus>, ControlError> {
    let mut status = node.cluster_status()?;
    status.unhealthy_vdisks = node.unhealthy_vdisks().await;
    Ok(Json(status))
}

/// Body of `PUT /api/v1/debug/partition` (fault injection, tests only; not
/// part of the documented API).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Partition {
    /// Node ids this node stops talking to; empty heals.
    nodes: Vec<u64>,
}

async fn set_partition(
    State(node): State<Arc<Node>>,
    payload: Result<Json<Partition>, JsonRejection>,
) -> Result<StatusCode, ControlError> {
    let request = body(payload)?;
    node.set_partition(request.nodes)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The node's disks.
#[utoipa::path(get, path = "/api/v1/disks", responses((status = 200, body = [Disk])))]
async fn list_disks(State(node): State<Arc<Node>>) -> Json<Vec<Disk>> {
    Json(node.disks())
}

/// All vdisks.
#[utoipa::path(get, path = "/api/v1/vdisks", responses((status = 200, body = [Vdisk])))]
async fn list_vdisks(State(node): State<Arc<Node>>) -> Json<Vec<Vdisk>> {
    Json(node.vdisks())
}

/// Creates a thin-provisioned vdisk, reachable over NBD as soon as this returns.
#[utoipa::path(
    post,
    path = "/api/v1/vdisks",
    request_body = CreateVdisk,
    responses(
        (status = 201, body = Vdisk),
        (status = 400, body = ErrorBody, description = "bad name or size"),
        (status = 409, body = ErrorBody, description = "name taken")
    )
)]
async fn create_vdisk(
    State(node): State<Arc<Node>>,
    payload: Result<Json<CreateVdisk>, JsonRejection>,
) -> Result<(StatusCode, Json<Vdisk>), ControlError> {
    let request = body(payload)?;
    let vdisk = match &request.from {
        Some(from) => {
            node.clone_vdisk(&request.name, from, request.size, request.rf)
                .await?
        }
        None => {
            node.create_vdisk(&request.name, request.size, request.rf)
                .await?
        }
    };
    Ok((StatusCode::CREATED, Json(vdisk)))
}

/// One vdisk.
#[utoipa::path(
    get,
    path = "/api/v1/vdisks/{name}",
    params(("name" = String, Path, description = "vdisk name")),
    responses((status = 200, body = Vdisk), (status = 404, body = ErrorBody))
)]
async fn get_vdisk(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Vdisk>, ControlError> {
    Ok(Json(node.vdisk_with_progress(&name).await?))
}

/// Grows a vdisk.
#[utoipa::path(
    post,
    path = "/api/v1/vdisks/{name}/resize",
    params(("name" = String, Path, description = "vdisk name")),
    request_body = ResizeVdisk,
    responses(
        (status = 200, body = Vdisk),
        (status = 400, body = ErrorBody, description = "smaller than now, zero or beyond capacity"),
        (status = 404, body = ErrorBody)
    )
)]
async fn resize_vdisk(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    payload: Result<Json<ResizeVdisk>, JsonRejection>,
) -> Result<Json<Vdisk>, ControlError> {
    let request = body(payload)?;
    Ok(Json(node.resize_vdisk(&name, request.size).await?))
}

/// Deletes a vdisk and frees its space.
#[utoipa::path(
    delete,
    path = "/api/v1/vdisks/{name}",
    params(("name" = String, Path, description = "vdisk name")),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "exported over vhost-user")
    )
)]
async fn delete_vdisk(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ControlError> {
    node.delete_vdisk(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Exports a vdisk over vhost-user-blk and returns the socket path.
#[utoipa::path(
    post,
    path = "/api/v1/vdisks/{name}/vhost",
    params(("name" = String, Path, description = "vdisk name")),
    responses((status = 200, body = VhostExport), (status = 404, body = ErrorBody))
)]
async fn export_vhost(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<VhostExport>, ControlError> {
    let node = node.clone();
    let export = tokio::task::spawn_blocking(move || node.export_vhost(&name))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    Ok(Json(export))
}

/// Stops the vhost-user export of a vdisk.
#[utoipa::path(
    delete,
    path = "/api/v1/vdisks/{name}/vhost",
    params(("name" = String, Path, description = "vdisk name")),
    responses((status = 204, description = "export stopped"), (status = 404, body = ErrorBody))
)]
async fn unexport_vhost(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ControlError> {
    tokio::task::spawn_blocking(move || node.unexport_vhost(&name))
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}

/// Largest boot file (kernel, initrd) one upload takes.
const MAX_UPLOAD: usize = 512 << 20;

/// Writes the request body at the start of a vdisk (a VM's kernel or
/// initrd): the vdisk must exist and be large enough.
#[utoipa::path(
    put,
    path = "/api/v1/vdisks/{name}/content",
    params(("name" = String, Path, description = "vdisk name")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, body = StoredFile),
        (status = 400, body = ErrorBody, description = "empty or larger than the vdisk"),
        (status = 404, body = ErrorBody)
    )
)]
async fn upload_content(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    content: axum::body::Bytes,
) -> Result<Json<StoredFile>, ControlError> {
    Ok(Json(node.write_vdisk_content(&name, content).await?))
}

/// All VMs.
#[utoipa::path(get, path = "/api/v1/vms", responses((status = 200, body = [Vm])))]
async fn list_vms(State(node): State<Arc<Node>>) -> Json<Vec<Vm>> {
    Json(node.vms())
}

/// Defines a VM (stopped). With `dry_run`, only checks the request
/// (answers 204).
#[utoipa::path(
    post,
    path = "/api/v1/vms",
    request_body = CreateVm,
    responses(
        (status = 201, body = Vm),
        (status = 204, description = "dry run: the request is valid"),
        (status = 400, body = ErrorBody, description = "bad name, sizes or boot source"),
        (status = 404, body = ErrorBody, description = "unknown vdisk"),
        (status = 409, body = ErrorBody, description = "name taken, or a vdisk attached to a running VM")
    )
)]
async fn create_vm(
    State(node): State<Arc<Node>>,
    payload: Result<Json<CreateVm>, JsonRejection>,
) -> Result<Response, ControlError> {
    let request = body(payload)?;
    Ok(match node.create_vm(request).await? {
        Some(vm) => (StatusCode::CREATED, Json(vm)).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// One VM.
#[utoipa::path(
    get,
    path = "/api/v1/vms/{name}",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody))
)]
async fn get_vm(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ControlError> {
    Ok(Json(node.vm(&name)?))
}

/// Deletes a stopped VM (and the vdisks holding its uploaded boot files).
#[utoipa::path(
    delete,
    path = "/api/v1/vms/{name}",
    params(("name" = String, Path, description = "VM name")),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not stopped")
    )
)]
async fn delete_vm(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ControlError> {
    node.delete_vm(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a VM on the node with the most free memory that has room for it;
/// answers once its QEMU runs.
#[utoipa::path(
    post,
    path = "/api/v1/vms/{name}/start",
    params(("name" = String, Path, description = "VM name")),
    responses(
        (status = 200, body = Vm),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "no node has room, or a vdisk is attached to another running VM"),
        (status = 500, body = ErrorBody, description = "QEMU could not start")
    )
)]
async fn start_vm(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ControlError> {
    Ok(Json(node.start_vm(&name).await?))
}

/// The optional JSON body of `stop` and `restart` (empty: defaults).
fn stop_options(payload: &[u8]) -> Result<StopVm, ControlError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(StopVm::default());
    }
    serde_json::from_slice(payload)
        .map_err(|e| ControlError::BadRequest(format!("invalid stop options: {e}")))
}

/// Default seconds a graceful stop waits for the guest.
const STOP_TIMEOUT: u64 = 30;

/// Stops a VM: asks the guest to power off (ACPI), forced after the
/// timeout, or at once with `force`; answers once QEMU is gone.
#[utoipa::path(
    post,
    path = "/api/v1/vms/{name}/stop",
    params(("name" = String, Path, description = "VM name")),
    request_body = StopVm,
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody))
)]
async fn stop_vm(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    payload: axum::body::Bytes,
) -> Result<Json<Vm>, ControlError> {
    let options = stop_options(&payload)?;
    let timeout = options.timeout.unwrap_or(STOP_TIMEOUT);
    Ok(Json(node.stop_vm(&name, options.force, timeout).await?))
}

/// Stops a VM (as `stop` does) and starts it again.
#[utoipa::path(
    post,
    path = "/api/v1/vms/{name}/restart",
    params(("name" = String, Path, description = "VM name")),
    request_body = StopVm,
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody))
)]
async fn restart_vm(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    payload: axum::body::Bytes,
) -> Result<Json<Vm>, ControlError> {
    let options = stop_options(&payload)?;
    let timeout = options.timeout.unwrap_or(STOP_TIMEOUT);
    node.stop_vm(&name, options.force, timeout).await?;
    Ok(Json(node.start_vm(&name).await?))
}

/// Starts a live migration to another node; answers at once. Follow it
/// with `GET /api/v1/vms/{name}` (`migration` shows the progress).
#[utoipa::path(
    post,
    path = "/api/v1/vms/{name}/migrate",
    params(("name" = String, Path, description = "VM name")),
    request_body = MigrateVm,
    responses(
        (status = 200, body = Vm),
        (status = 400, body = ErrorBody, description = "already on that node"),
        (status = 404, body = ErrorBody, description = "unknown VM or node"),
        (status = 409, body = ErrorBody, description = "not running, already migrating, or no room there")
    )
)]
async fn migrate_vm(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    payload: Result<Json<MigrateVm>, JsonRejection>,
) -> Result<Json<Vm>, ControlError> {
    let request = body(payload)?;
    Ok(Json(node.migrate_vm(&name, request.to).await?))
}

/// Query of `GET /api/v1/vms/{name}/console`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
struct ConsoleQuery {
    /// Byte offset to read from.
    #[serde(default)]
    offset: u64,
}

/// A piece (up to 1 MiB) of a VM's serial console, from the node that runs it.
#[utoipa::path(
    get,
    path = "/api/v1/vms/{name}/console",
    params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses((status = 200, body = ConsoleChunk), (status = 404, body = ErrorBody))
)]
async fn vm_console(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    query: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ConsoleChunk>, ControlError> {
    let Query(query) = query.map_err(|e| ControlError::BadRequest(e.body_text()))?;
    Ok(Json(node.vm_console(&name, query.offset).await?))
}
