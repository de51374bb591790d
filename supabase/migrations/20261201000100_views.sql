-- Reading the data: views for dashboards and reports, and what each run was.

-- Each run says what kind it was and how it was started (the command line, without secrets).
alter table public.aggregator_runs add column if not exists kind text;
alter table public.aggregator_runs add column if not exists arguments text;

-- One row per site and day, with the domain and both final flags.
create or replace view public.analytics_daily as
select a.date, a.site_id, s.domain,
       a.matomo_visits, a.matomo_final,
       a.gsc_clicks, a.gsc_impressions, a.gsc_ctr, a.gsc_position, a.gsc_final,
       a.updated_at
from public.daily_analytics a
join public.sites s on s.id = a.site_id;

-- Roll-ups. CTR over a period is its clicks over its impressions, and position the average of
-- each day's position weighted by that day's impressions: summing or averaging daily CTRs (or
-- positions) gives wrong numbers. *_complete: every day of the period is stored and final.
create or replace view public.analytics_periods as
select p.period, date_trunc(p.period, a.date)::date as starts, a.site_id, s.domain,
       sum(a.matomo_visits) as matomo_visits,
       sum(a.gsc_clicks) as gsc_clicks,
       sum(a.gsc_impressions) as gsc_impressions,
       sum(a.gsc_clicks)::double precision / nullif(sum(a.gsc_impressions), 0) as gsc_ctr,
       sum(a.gsc_position * a.gsc_impressions)
           / nullif(sum(a.gsc_impressions) filter (where a.gsc_position is not null), 0) as gsc_position,
       count(*) filter (where a.matomo_final) = max(p.days) as matomo_complete,
       count(*) filter (where a.gsc_final) = max(p.days) as gsc_complete
from public.daily_analytics a
join public.sites s on s.id = a.site_id
cross join lateral (values
    ('week', 7),
    ('month', extract(day from date_trunc('month', a.date) + interval '1 month - 1 day')::int)
) as p (period, days)
group by 1, 2, 3, 4;

create or replace view public.analytics_weekly as
select starts as week, site_id, domain, matomo_visits, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position,
       matomo_complete, gsc_complete
from public.analytics_periods where period = 'week';

create or replace view public.analytics_monthly as
select starts as month, site_id, domain, matomo_visits, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position,
       matomo_complete, gsc_complete
from public.analytics_periods where period = 'month';

-- The last runs: what kind, how long ago, how it ended.
create or replace view public.analytics_runs as
select id, kind, arguments, started_at, finished_at, now() - finished_at as age,
       date_from, date_to, sites, records_stored, records_not_stored, exit_status
from public.aggregator_runs;

-- Supabase grants every new table and view to anon and authenticated: these views read the
-- tables as their owner, so they are for the roles you grant them to, and no other.
revoke all on public.analytics_daily, public.analytics_periods, public.analytics_weekly,
    public.analytics_monthly, public.analytics_runs from anon, authenticated;

-- A dashboard's own read-only role, for these views only (never gsc_accounts), e.g.:
--   create role dashboard login password '...';
--   grant usage on schema public to dashboard;
--   grant select on public.analytics_daily, public.analytics_weekly, public.analytics_monthly,
--       public.analytics_runs to dashboard;
