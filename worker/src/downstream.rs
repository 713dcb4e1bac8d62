//! The optional downstream call: POST the order as JSON with
//! `Idempotency-Key: <pipeline>:<order key>` (scoped by pipeline, any id
//! encoded), classified as ok, transient or permanent.

use std::time::Duration;

use orderpipeline_proto::OrderCreated;

use orderpipeline_protocol::decide::{CallClass, classify_status};

#[derive(Clone)]
pub struct Downstream {
    client: reqwest::Client,
    url: String,
}

/// The result of one call.
#[derive(Debug)]
pub struct CallResult {
    pub class: CallClass,
    /// What happened, for logs, dead letters and span status.
    pub detail: String,
}

impl Downstream {
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn call(
        &self,
        order: &OrderCreated,
        idempotency_key: &str,
        headers: reqwest::header::HeaderMap,
    ) -> CallResult {
        let body = serde_json::json!({
            "order_id": order.order_id,
            "customer_id": order.customer_id,
            "total_amount": order.total_amount,
            "items": order.items.iter().map(|i| serde_json::json!({
                "product_id": i.product_id, "quantity": i.quantity, "unit_price": i.unit_price,
            })).collect::<Vec<_>>(),
        });
        let req = self
            .client
            .post(&self.url)
            .headers(headers)
            .header("Idempotency-Key", idempotency_key)
            .header("Content-Type", "application/json")
            .body(body.to_string());
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                CallResult {
                    class: classify_status(status),
                    detail: format!("POST {} answered {status}", self.url),
                }
            }
            Err(e) => CallResult {
                class: CallClass::Transient,
                detail: if e.is_timeout() {
                    format!("POST {} timed out", self.url)
                } else {
                    format!("POST {} failed: {e}", self.url)
                },
            },
        }
    }
}
