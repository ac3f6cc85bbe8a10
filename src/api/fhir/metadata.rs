//! GET /fhir/metadata: the CapabilityStatement. It lists only what is implemented.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::ok;
use crate::api::context::Member;
use crate::api::AppState;

pub async fn capability_statement(_member: Member, state: web::Data<AppState>) -> HttpResponse {
    let param = |name: &str, kind: &str, doc: &str| json!({ "name": name, "type": kind, "documentation": doc });
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": crate::time::to_instant(crate::time::now_micros()),
        "publisher": state.config.exchange.name,
        "kind": "instance",
        "software": { "name": "hie-broker", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": state.config.exchange.name, "url": state.config.fhir_base() },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "interaction": [
                { "code": "batch", "documentation": "Bundles of Patient feeds (PUT Patient?identifier=…)" },
                { "code": "transaction", "documentation": "MHD ITI-65 Provide Document Bundle: one SubmissionSet List plus DocumentReferences whose attachments stay in the member's repository (url under its registered FHIR base, size, SHA-1 hash); atomic" }
            ],
            "documentation": "Every request needs a client certificate issued by the exchange CA and registered to an active member organisation, and (except for this statement) an X-Purpose-Of-Use header with an HL7 PurposeOfUse code; X-User-Id and X-User-Role name the person behind the request.",
            "security": {
                "cors": false,
                "description": "Mutual TLS (TLS 1.2+). Every disclosure is recorded in a hash-chained audit trail before it is sent."
            },
            "resource": [
                {
                    "type": "Patient",
                    "documentation": "Master patient index. PUT ?identifier= is the IHE PIXm ITI-104 feed (a member writes only identifiers in the systems it owns; link replaced-by merges); GET is PDQm ITI-78 (one entry per person, with every identifier); src-N ids are member records, ent-N ids are people.",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }, { "code": "update" }, { "code": "delete" }],
                    "conditionalUpdate": true,
                    "conditionalDelete": "single",
                    "searchParam": [
                        param("family", "string", "family name, prefix; :exact and :phonetic supported"),
                        param("given", "string", "given name, prefix; :exact and :phonetic supported"),
                        param("birthdate", "date", "birth date; prefixes ge, gt, le, lt, eq"),
                        param("gender", "token", "male, female, other"),
                        param("identifier", "token", "system|value of any identifier linked to the person"),
                        param("address-postalcode", "string", "postal code, prefix"),
                        param("telecom", "token", "phone number"),
                        param("_id", "token", "person id (ent-N)")
                    ],
                    "operation": [
                        { "name": "ihe-pix", "definition": "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix" },
                        { "name": "match", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-match" },
                        { "name": "review-queue", "definition": "urn:hie-broker:operation:review-queue", "documentation": "operators: potential matches and duplicates with score breakdowns" },
                        { "name": "resolve-review", "definition": "urn:hie-broker:operation:resolve-review", "documentation": "operators: same-person or not-same-person" },
                        { "name": "unlink", "definition": "urn:hie-broker:operation:unlink" },
                        { "name": "merge", "definition": "urn:hie-broker:operation:merge" },
                        { "name": "unmerge", "definition": "urn:hie-broker:operation:unmerge" }
                    ]
                },
                {
                    "type": "Organization",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [
                        param("_id", "token", "organisation id"),
                        param("name", "string", "name, case-insensitive prefix"),
                        param("type", "token", "member type: hospital, clinic, lab, pharmacy, emergency, operator"),
                        param("active", "token", "true or false")
                    ]
                },
                {
                    "type": "Endpoint",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [
                        param("_id", "token", "endpoint id (the member's organisation id)"),
                        param("organization", "reference", "managing organisation"),
                        param("status", "token", "active or suspended")
                    ]
                },
                {
                    "type": "DocumentReference",
                    "documentation": "MHD document registry (ITI-67). Results from every member holding documents about the person; meta.source and custodian name the holder; attachment.url is the broker's ITI-68 retrieve URL (Binary/doc-N). GET and POST _search.",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [
                        param("patient", "reference", "Patient/ent-N or Patient/src-N"),
                        param("patient.identifier", "token", "system|value of any identifier linked to the person"),
                        param("status", "token", "current (default), superseded, entered-in-error"),
                        param("category", "token", "document class"),
                        param("type", "token", "document type"),
                        param("date", "date", "DocumentReference.date; prefixes ge, gt, le, lt, eq, ne"),
                        param("period", "date", "context.period"),
                        param("setting", "token", "context.practiceSetting"),
                        param("event", "token", "context.event"),
                        param("facility", "token", "context.facilityType"),
                        param("format", "token", "content.format"),
                        param("security-label", "token", "securityLabel (confidentiality and sensitivity)"),
                        param("author", "reference", "author reference"),
                        param("identifier", "token", "masterIdentifier or identifier"),
                        param("related", "reference", "context.related"),
                        param("relatesto", "reference", "relatesTo.target"),
                        param("relation", "token", "relatesTo.code: replaces, transforms, signs, appends"),
                        param("_sort", "string", "-date (default) or date"),
                        param("_offset", "number", "paging offset (see the next link)")
                    ]
                },
                {
                    "type": "List",
                    "documentation": "MHD SubmissionSets and Folders (ITI-66).",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [
                        param("patient", "reference", "Patient/ent-N or Patient/src-N"),
                        param("patient.identifier", "token", "system|value of any identifier linked to the person"),
                        param("code", "token", "submissionset or folder"),
                        param("status", "token", "current (default)"),
                        param("date", "date", "List.date"),
                        param("identifier", "token", "uniqueId"),
                        param("source", "reference", "List.source")
                    ]
                },
                {
                    "type": "Binary",
                    "documentation": "MHD ITI-68 retrieve: GET Binary/doc-N streams the document from the member that holds it, over mutual TLS with the broker's certificate; size and SHA-1 are checked against the registry and a transfer that differs is cut. 404 unknown, 410 superseded or entered-in-error, 502 member unreachable or answering badly, 504 member too slow.",
                    "interaction": [{ "code": "read" }]
                },
                {
                    "type": "Consent",
                    "documentation": "Patients' consent directives, recorded by a member acting on the patient's request (PATRQT) or by an operator; versioned (PUT needs If-Match). provision: deny (opt out), deny + actor (deny organisations), deny + securityLabel (restrict sensitive categories), permit (opt in). Enforced on every read path; ETREAT + X-Break-Glass-Reason overrides (flagged, audited).",
                    "versioning": "versioned",
                    "readHistory": true,
                    "updateCreate": false,
                    "interaction": [{ "code": "create" }, { "code": "update" }, { "code": "read" }, { "code": "history-instance" }, { "code": "search-type" }],
                    "searchParam": [
                        param("patient", "reference", "Patient/ent-N or Patient/src-N"),
                        param("patient.identifier", "token", "system|value of any identifier linked to the person")
                    ]
                },
                {
                    "type": "AuditEvent",
                    "documentation": "Exchange operators search the whole trail. A member holding a patient reads that patient's accounting of disclosures with purpose PATRQT and patient=.",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [
                        param("date", "date", "when recorded; prefixes ge, gt, le, lt, eq"),
                        param("agent", "reference", "organisation id or user id"),
                        param("entity", "reference", "what was touched, e.g. Organization/x"),
                        param("patient", "reference", "the patient concerned"),
                        param("purpose", "token", "purpose of use code"),
                        param("outcome", "token", "0, 4, 8 or 12"),
                        param("action", "token", "C, R, U, D or E"),
                        param("subtype", "token", "interaction or operator action"),
                        param("break-glass", "token", "true: only break-the-glass accesses")
                    ]
                }
            ]
        }]
    });
    ok(&body)
}
