//! Client API routes for enrolling agents (admin): rotate an agent's secret, and make, list
//! and revoke registration tokens. They translate HTTP to the registry's enrollment messages
//! ([`crate::actors::enrollment`]) and back.

use actix_web::{get, post, web, HttpResponse};

use super::error::ApiError;
use super::AppState;
use crate::actors::enrollment::{
    valid_name, CreateRegistrationToken, ListRegistrationTokens, RevokeRegistrationToken,
    RotateSecret,
};
use crate::protocol::NewRegistrationToken;

#[post("/agents/{name}/rotate-secret")]
async fn rotate_secret(
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = name.into_inner();
    if !valid_name(&name) {
        return Err(ApiError::bad_request(format!(
            "{name:?} is not a valid agent name"
        )));
    }
    let rotated = state
        .registry
        .send(RotateSecret(name))
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(rotated))
}

#[post("/registration-tokens")]
async fn new_token(
    state: web::Data<AppState>,
    body: web::Json<NewRegistrationToken>,
) -> Result<HttpResponse, ApiError> {
    let created = state
        .registry
        .send(CreateRegistrationToken(body.into_inner()))
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(created))
}

#[get("/registration-tokens")]
async fn list_tokens(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let list = state
        .registry
        .send(ListRegistrationTokens)
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(list))
}

#[post("/registration-tokens/{id}/revoke")]
async fn revoke_token(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let revoked = state
        .registry
        .send(RevokeRegistrationToken(id.into_inner()))
        .await
        .map_err(ApiError::mailbox)??;
    Ok(HttpResponse::Ok().json(revoked))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(rotate_secret)
        .service(new_token)
        .service(list_tokens)
        .service(revoke_token);
}
