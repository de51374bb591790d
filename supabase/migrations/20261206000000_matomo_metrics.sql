-- The rest of Matomo's answer, which every run already receives (VisitsSummary.get): unique
-- visitors, actions (pageviews, downloads, outlinks), bounces (one-action visits) and the total
-- time on site. They are fetched, confirmed and final together with matomo_visits (one
-- matomo_final for the row's Matomo values). NULL: not fetched (rows stored before this
-- migration keep NULL: a backfill with --from/--to fills them), or not in Matomo's answer (an
-- install may not count unique visitors); never 0 for either. This migration only adds.
alter table public.daily_analytics add column if not exists matomo_unique_visitors integer
    check (matomo_unique_visitors >= 0);
alter table public.daily_analytics add column if not exists matomo_actions integer check (matomo_actions >= 0);
alter table public.daily_analytics add column if not exists matomo_bounces integer check (matomo_bounces >= 0);
alter table public.daily_analytics add column if not exists matomo_visit_seconds bigint
    check (matomo_visit_seconds >= 0);

-- The views gain them (a view's new columns go after its old ones). Bounce rate and average time
-- on site are derived from counts over the same visits: a period's from its sums, never an
-- average of daily rates. Unique visitors do not add up across days (one visitor on two days is
-- one unique visitor of the week): the weekly and monthly views leave them out.
create or replace view public.analytics_daily as
select a.date, a.site_id, s.domain,
       a.matomo_visits, a.matomo_final,
       a.gsc_clicks, a.gsc_impressions, a.gsc_ctr, a.gsc_position, a.gsc_final,
       a.updated_at,
       a.matomo_unique_visitors, a.matomo_actions, a.matomo_bounces, a.matomo_visit_seconds,
       a.matomo_bounces::double precision / nullif(a.matomo_visits, 0) as matomo_bounce_rate,
       a.matomo_visit_seconds::double precision / nullif(a.matomo_visits, 0) as matomo_avg_visit_seconds
from public.daily_analytics a
join public.sites s on s.id = a.site_id;

-- matomo_complete vouches for the visits (every day stored and final); matomo_metrics_complete
-- for the other Matomo numbers too (every day's actions, bounces and time stored).
create or replace view public.analytics_periods as
select p.period, date_trunc(p.period, a.date)::date as starts, a.site_id, s.domain,
       sum(a.matomo_visits) as matomo_visits,
       sum(a.gsc_clicks) as gsc_clicks,
       sum(a.gsc_impressions) as gsc_impressions,
       sum(a.gsc_clicks)::double precision / nullif(sum(a.gsc_impressions), 0) as gsc_ctr,
       sum(a.gsc_position * a.gsc_impressions)
           / nullif(sum(a.gsc_impressions) filter (where a.gsc_position is not null), 0) as gsc_position,
       count(*) filter (where a.matomo_final) = max(p.days) as matomo_complete,
       count(*) filter (where a.gsc_final) = max(p.days) as gsc_complete,
       sum(a.matomo_actions) as matomo_actions,
       sum(a.matomo_bounces) as matomo_bounces,
       sum(a.matomo_visit_seconds) as matomo_visit_seconds,
       sum(a.matomo_bounces)::double precision
           / nullif(sum(a.matomo_visits) filter (where a.matomo_bounces is not null), 0) as matomo_bounce_rate,
       sum(a.matomo_visit_seconds)::double precision
           / nullif(sum(a.matomo_visits) filter (where a.matomo_visit_seconds is not null), 0)
           as matomo_avg_visit_seconds,
       count(*) filter (
           where a.matomo_final and a.matomo_actions is not null and a.matomo_bounces is not null
               and a.matomo_visit_seconds is not null
       ) = max(p.days) as matomo_metrics_complete
from public.daily_analytics a
join public.sites s on s.id = a.site_id
cross join lateral (values
    ('week', 7),
    ('month', extract(day from date_trunc('month', a.date) + interval '1 month - 1 day')::int)
) as p (period, days)
group by 1, 2, 3, 4;

create or replace view public.analytics_weekly as
select starts as week, site_id, domain, matomo_visits, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position,
       matomo_complete, gsc_complete,
       matomo_actions, matomo_bounces, matomo_visit_seconds, matomo_bounce_rate, matomo_avg_visit_seconds,
       matomo_metrics_complete
from public.analytics_periods where period = 'week';

create or replace view public.analytics_monthly as
select starts as month, site_id, domain, matomo_visits, gsc_clicks, gsc_impressions, gsc_ctr, gsc_position,
       matomo_complete, gsc_complete,
       matomo_actions, matomo_bounces, matomo_visit_seconds, matomo_bounce_rate, matomo_avg_visit_seconds,
       matomo_metrics_complete
from public.analytics_periods where period = 'month';

-- create or replace keeps the views' grants: still none for anon and authenticated.
