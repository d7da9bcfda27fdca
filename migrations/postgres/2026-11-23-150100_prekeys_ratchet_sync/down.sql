DROP TABLE key_packages;
DROP TABLE ratchet_states;
DROP TABLE prekey_claim_windows;
DROP TABLE prekeys;
