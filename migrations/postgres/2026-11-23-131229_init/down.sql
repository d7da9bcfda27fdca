DROP TABLE api_tokens;
DROP TABLE audit_events;
DROP TABLE service_keys;
DROP TABLE staff_keys;
DROP TABLE session_members;
DROP TABLE session_keys;
DROP TABLE sessions;
DROP TABLE user_keys;
