DROP TABLE trusted_users;
DROP INDEX session_keys_live_by_recipient;
DROP TABLE messages;
