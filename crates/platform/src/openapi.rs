//! The OpenAPI 3.1 document of the HTTP surface, served at
//! `/api/openapi.json`. It is a static file (`openapi.json`, next to this
//! module) so it reads and diffs as the contract it is; a test keeps it in
//! step with the routes `api::api_routes` serves.
//!
//! This module describes routes; it does not serve or check them.

/// The document, as served.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use super::OPENAPI_JSON;

    #[test]
    fn is_openapi_3_1_with_bearer_security() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        for open in ["/healthz", "/readyz", "/metrics", "/webhooks/resend"] {
            let op = doc["paths"][open].as_object().unwrap().values().next().unwrap().clone();
            assert_eq!(op["security"], serde_json::json!([]), "{open} needs no auth");
        }
        // Every $ref points at something that exists.
        let text = OPENAPI_JSON;
        for piece in text.split("\"$ref\": \"#/").skip(1) {
            let target = &piece[..piece.find('"').unwrap()];
            let mut node = &doc;
            for part in target.split('/') {
                node = &node[part];
            }
            assert!(!node.is_null(), "dangling $ref {target}");
        }
    }
}
