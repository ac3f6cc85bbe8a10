// One schema for both backends; the migrations in migrations/{sqlite,postgres} create it.

diesel::table! {
    organizations (id) {
        id -> Text,
        name -> Text,
        org_type -> Text,
        status -> Text,
        fhir_base -> Nullable<Text>,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    org_certificates (fingerprint) {
        fingerprint -> Text,
        org_id -> Text,
        subject -> Text,
        serial -> Text,
        not_after -> BigInt,
        added_at -> BigInt,
    }
}

diesel::table! {
    org_identifier_systems (system) {
        system -> Text,
        org_id -> Text,
    }
}

diesel::table! {
    audit_events (seq) {
        seq -> BigInt,
        recorded_at -> BigInt,
        org_id -> Nullable<Text>,
        user_id -> Nullable<Text>,
        user_role -> Nullable<Text>,
        purpose -> Nullable<Text>,
        client_addr -> Nullable<Text>,
        request_id -> Nullable<Text>,
        event_type -> Text,
        action -> Text,
        subtype -> Text,
        patient -> Nullable<Text>,
        entity -> Nullable<Text>,
        query -> Nullable<Text>,
        outcome -> Text,
        outcome_desc -> Nullable<Text>,
        prev_hash -> Text,
        hash -> Text,
    }
}

diesel::table! {
    audit_head (id) {
        id -> Integer,
        seq -> BigInt,
        hash -> Text,
    }
}

diesel::joinable!(org_certificates -> organizations (org_id));
diesel::joinable!(org_identifier_systems -> organizations (org_id));
diesel::allow_tables_to_appear_in_same_query!(
    organizations,
    org_certificates,
    org_identifier_systems
);
