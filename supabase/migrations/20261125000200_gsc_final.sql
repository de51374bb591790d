-- Search Console revises its last days: a value fetched before Google calls the day final is
-- provisional. gsc_final says which: true (final), false (provisional, a later run replaces it),
-- NULL (no Search Console value was ever stored for this row).
alter table public.daily_analytics add column if not exists gsc_final boolean;

-- Values stored before this column existed were asked for as final data.
update public.daily_analytics set gsc_final = true where gsc_clicks is not null and gsc_final is null;

-- A final value is never replaced by a provisional one, whatever a run sends: the database
-- keeps the final numbers and lets the rest of the row (Matomo) be updated.
create or replace function public.daily_analytics_keep_final_gsc() returns trigger
language plpgsql as $$
begin
    if old.gsc_final and new.gsc_final is not true then
        new.gsc_clicks := old.gsc_clicks;
        new.gsc_impressions := old.gsc_impressions;
        new.gsc_ctr := old.gsc_ctr;
        new.gsc_position := old.gsc_position;
        new.gsc_final := old.gsc_final;
    end if;
    return new;
end;
$$;

drop trigger if exists daily_analytics_keep_final_gsc on public.daily_analytics;
create trigger daily_analytics_keep_final_gsc
    before update on public.daily_analytics
    for each row execute function public.daily_analytics_keep_final_gsc();

-- Later runs look for the provisional days of the last two weeks.
create index if not exists daily_analytics_provisional_idx on public.daily_analytics (date)
    where gsc_final is false;
