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
        break_glass -> Nullable<Text>,
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

diesel::table! {
    identities (id) {
        id -> BigInt,
        status -> Text,
        merged_into -> Nullable<BigInt>,
        golden -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    source_records (id) {
        id -> BigInt,
        org_id -> Text,
        system -> Text,
        value -> Text,
        enterprise_id -> BigInt,
        status -> Text,
        replaced_by -> Nullable<BigInt>,
        link_kind -> Text,
        version -> BigInt,
        resource -> Text,
        family -> Nullable<Text>,
        given -> Nullable<Text>,
        family_phonetic -> Nullable<Text>,
        given_phonetic -> Nullable<Text>,
        birth_date -> Nullable<Text>,
        gender -> Nullable<Text>,
        postcode -> Nullable<Text>,
        phone -> Nullable<Text>,
        demographics -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
        consent_hides -> Text,
    }
}

diesel::table! {
    source_identifiers (system, value, source_id) {
        system -> Text,
        value -> Text,
        source_id -> BigInt,
    }
}

diesel::table! {
    blocking_keys (key, source_id) {
        key -> BigInt,
        source_id -> BigInt,
    }
}

diesel::table! {
    match_reviews (id) {
        id -> BigInt,
        source_a -> BigInt,
        source_b -> BigInt,
        kind -> Text,
        score -> Double,
        breakdown -> Text,
        status -> Text,
        created_at -> BigInt,
        resolved_at -> Nullable<BigInt>,
        resolved_by -> Nullable<Text>,
    }
}

diesel::table! {
    non_matches (source_a, source_b) {
        source_a -> BigInt,
        source_b -> BigInt,
        created_at -> BigInt,
    }
}

diesel::table! {
    match_decisions (id) {
        id -> BigInt,
        source_id -> BigInt,
        candidate_id -> Nullable<BigInt>,
        outcome -> Text,
        score -> Nullable<Double>,
        breakdown -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    identity_history (id) {
        id -> BigInt,
        enterprise_id -> BigInt,
        action -> Text,
        detail -> Text,
        actor -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    source_records,
    source_identifiers,
    identities,
    blocking_keys
);

diesel::table! {
    documents (id) {
        id -> BigInt,
        master_id -> Text,
        org_id -> Text,
        source_id -> BigInt,
        list_id -> Nullable<BigInt>,
        status -> Text,
        doc_date -> Nullable<BigInt>,
        content_type -> Text,
        url -> Text,
        size -> BigInt,
        hash -> Text,
        digest -> Text,
        resource -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    document_lists (id) {
        id -> BigInt,
        master_id -> Text,
        kind -> Text,
        org_id -> Text,
        source_id -> BigInt,
        status -> Text,
        list_date -> Nullable<BigInt>,
        digest -> Text,
        resource -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    consents (id) {
        id -> BigInt,
        consent_id -> BigInt,
        version -> BigInt,
        is_current -> BigInt,
        source_id -> BigInt,
        org_id -> Text,
        status -> Text,
        rule -> Text,
        hides -> Text,
        resource -> Text,
        created_at -> BigInt,
    }
}

diesel::joinable!(consents -> source_records (source_id));
diesel::allow_tables_to_appear_in_same_query!(consents, source_records);
