-- Login attempts are also counted per e-mail (however it is capitalised, and whether or not a
-- user has it), so a guesser spread over many addresses meets a limit too.
CREATE INDEX login_attempts_email_idx ON login_attempts (lower(email), attempted_at);
