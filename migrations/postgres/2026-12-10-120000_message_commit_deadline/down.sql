DROP TRIGGER messages_commit_deadline ON messages;
DROP FUNCTION keyhold_message_commit_deadline();
DROP FUNCTION keyhold_message_deadline_unqueued();
