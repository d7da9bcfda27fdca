//! Diesel's view of the tables that `migrations/` create, the same on both backends.
//!
//! Written by hand rather than by `diesel print-schema` because one file serves SQLite and
//! PostgreSQL: only types both spell the same way are used (`BigInt`, `Integer`, `SmallInt`,
//! `Binary`, `Text`, `Nullable`). A change to a migration changes this file in the same commit.

#![allow(missing_docs)] // Generated items; the tables are described in the migrations.

diesel::table! {
    user_keys (key_id) {
        key_id -> Binary,
        user_id -> Text,
        device_id -> Text,
        version -> Integer,
        suite -> SmallInt,
        encapsulation_key -> Binary,
        identity_key -> Binary,
        signature -> Binary,
        created_at -> BigInt,
        superseded_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    sessions (session_id) {
        session_id -> Binary,
        author_user_id -> Text,
        author_device_id -> Nullable<Text>,
        mode -> SmallInt,
        suite -> SmallInt,
        current_epoch -> Integer,
        created_at -> BigInt,
        deleted_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    session_keys (id) {
        id -> BigInt,
        session_id -> Binary,
        epoch -> Integer,
        recipient_user_id -> Text,
        recipient_device_id -> Text,
        key_id -> Binary,
        envelope -> Binary,
        created_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    session_members (session_id, user_id, device_id) {
        session_id -> Binary,
        user_id -> Text,
        device_id -> Text,
        key_id -> Binary,
        added_epoch -> Integer,
        removed_epoch -> Nullable<Integer>,
    }
}

diesel::table! {
    staff_keys (session_id, epoch) {
        session_id -> Binary,
        epoch -> Integer,
        escrow_key_id -> Binary,
        envelope -> Binary,
        created_at -> BigInt,
    }
}

diesel::table! {
    service_keys (session_id, epoch) {
        session_id -> Binary,
        epoch -> Integer,
        kek_version -> Integer,
        envelope -> Binary,
        created_at -> BigInt,
    }
}

diesel::table! {
    audit_events (seq) {
        seq -> BigInt,
        at -> BigInt,
        actor -> Text,
        action -> Text,
        target -> Text,
        reason -> Nullable<Text>,
        prev_hash -> Binary,
        hash -> Binary,
    }
}

diesel::table! {
    api_tokens (token_id) {
        token_id -> Binary,
        token_hash -> Binary,
        role -> SmallInt,
        user_id -> Nullable<Text>,
        device_id -> Nullable<Text>,
        label -> Nullable<Text>,
        created_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    prekeys (id) {
        id -> BigInt,
        key_id -> Binary,
        user_id -> Text,
        device_id -> Text,
        kind -> SmallInt,
        suite -> SmallInt,
        encapsulation_key -> Binary,
        identity_key -> Binary,
        signature -> Binary,
        created_at -> BigInt,
    }
}

diesel::table! {
    prekey_claim_windows (user_id, device_id, claimer, window_start) {
        user_id -> Text,
        device_id -> Text,
        claimer -> Text,
        window_start -> BigInt,
        claims -> Integer,
    }
}

diesel::table! {
    ratchet_states (user_id, device_id, conversation_id) {
        user_id -> Text,
        device_id -> Text,
        conversation_id -> Text,
        version -> BigInt,
        kek_version -> Integer,
        envelope -> Binary,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    key_packages (id) {
        id -> BigInt,
        user_id -> Text,
        sender_device_id -> Text,
        recipient_device_id -> Text,
        recipient_key_id -> Binary,
        payload -> Binary,
        created_at -> BigInt,
    }
}

diesel::table! {
    messages (message_id) {
        message_id -> Binary,
        session_id -> Binary,
        epoch -> Integer,
        author_user_id -> Text,
        author_device_id -> Nullable<Text>,
        nonce -> Binary,
        ciphertext -> Binary,
        associated_data -> Nullable<Binary>,
        created_at -> BigInt,
        deleted_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    trusted_users (author_user_id, trusted_user_id) {
        author_user_id -> Text,
        trusted_user_id -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    maintenance_runs (name) {
        name -> Text,
        completed_at -> BigInt,
        details -> Text,
    }
}

diesel::table! {
    idempotency_records (id) {
        id -> BigInt,
        scope -> Text,
        idempotency_key -> Text,
        rpc -> Text,
        request_hash -> Binary,
        response -> Nullable<Binary>,
        sealed_secret -> Nullable<Binary>,
        created_at -> BigInt,
    }
}

diesel::joinable!(messages -> sessions (session_id));
diesel::joinable!(session_keys -> sessions (session_id));
diesel::joinable!(session_members -> sessions (session_id));
diesel::joinable!(staff_keys -> sessions (session_id));
diesel::joinable!(service_keys -> sessions (session_id));

diesel::allow_tables_to_appear_in_same_query!(
    user_keys,
    sessions,
    session_keys,
    session_members,
    staff_keys,
    service_keys,
    audit_events,
    api_tokens,
    messages,
    trusted_users,
    prekeys,
    prekey_claim_windows,
    ratchet_states,
    key_packages,
    maintenance_runs,
    idempotency_records,
);
