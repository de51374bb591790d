-- A Search Console account is reached with either a user's OAuth refresh token or a Google
-- Cloud service account's JSON key (the key never expires by itself and needs no browser: the
-- site owner adds the service account's email as a user of each property). Both are
-- credentials: the table keeps row level security on and no policy, so only the service role
-- reads them.
alter table public.gsc_accounts add column if not exists service_account_key jsonb;
alter table public.gsc_accounts alter column oauth_refresh_token drop not null;

-- Exactly one of the two, so that a run never has to guess which one to use.
alter table public.gsc_accounts drop constraint if exists gsc_accounts_one_credential;
alter table public.gsc_accounts add constraint gsc_accounts_one_credential
    check ((oauth_refresh_token is null) <> (service_account_key is null));
